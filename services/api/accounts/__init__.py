"""Reading accounts and what is held about them."""
