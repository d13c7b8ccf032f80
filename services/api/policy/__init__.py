"""The scoring policy over HTTP: read the active version, publish a new one, preview a draft."""
