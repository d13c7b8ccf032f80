"""Ingestion of producer events: typed endpoints and the mixed batch."""
