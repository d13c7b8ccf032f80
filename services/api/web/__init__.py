"""The key-account workspace: server-rendered pages for managers and the head of sales."""
