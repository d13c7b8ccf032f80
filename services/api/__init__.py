"""The HTTP API: ingestion of producer events and the read API."""
