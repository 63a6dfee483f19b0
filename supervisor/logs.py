"""Structured logging: console lines on a terminal, JSON lines otherwise.

Every record carries a timestamp, a level and whatever the logger bound (the actor
path, its generation, a request id). Libraries that log through `logging` (nats-py,
pykka) go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

__all__ = ["configure_logging"]

_STAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _timestamp_unless_set(logger: Any, name: str, event_dict: Any) -> Any:
    """Stamp the event now, unless it carries its time already (a child's merged line)."""
    if "timestamp" in event_dict:
        return event_dict
    return _STAMPER(logger, name, event_dict)


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Configure structlog and the standard library's logging once, for the whole process."""
    numeric = logging.getLevelName(level.upper())
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp_unless_set,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    # pykka logs every crash it sees; supervision logs them once, with the actor path.
    logging.getLogger("pykka").setLevel(logging.CRITICAL)
