"""Structured logs for both processes: JSON in production, readable lines in development.

Log calls pass ids and counts, never payloads: contact PII must not reach a log line. Every
line written while a request is served carries its ``request_id`` (a structlog context
variable); lines of other libraries (through the standard ``logging`` module) are rendered the
same way, with the same context.
"""

from __future__ import annotations

import logging

import structlog

from shared.settings import Settings


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.dict_tracebacks
            if settings.log_json
            else structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only this module's handler (configured again by every app made in one process),
    # and leave others alone (a test runner's, say).
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level)


_HANDLER_NAME = "kam"
