"""The KAM processes: the HTTP API, the scorer worker and the ``kam`` command."""
