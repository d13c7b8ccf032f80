"""API keys: creation, verification, listing and revocation."""
