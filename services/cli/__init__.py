"""The ``kam`` command."""
