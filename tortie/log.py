"""Structured logging: one structlog logger per component.

JSON lines when not on a terminal (production, CI, files) or when TORTIE_LOG_FORMAT=json;
coloured key=value on a terminal. Configure once per process from its entry point.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


class _Stderr:
    """The process's stderr as it is at each write (a test runner swaps sys.stderr per
    test; a logger holding the first one would write to a closed stream)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str | None = None, fmt: str | None = None, stream=None) -> None:
    """Set up structlog for this process. Safe to call more than once."""
    global _configured
    stream = stream or _Stderr()
    level_name = (level or os.environ.get("TORTIE_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("TORTIE_LOG_FORMAT") or ("console" if stream.isatty() else "json")
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(component: str):
    """The logger of one component (datastore, ipam, routes, bgp, cni, ...).

    A lazy proxy: modules make their logger at import, and it takes the configuration in
    force when it first logs, so an entry point's configure() (say, tortiectl's default
    of warnings only) applies to every component.
    """
    if not _configured:
        configure()
    return structlog.get_logger(component=component)
