"""structlog set-up: JSON lines for machines, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import structlog

SECRET_KEYS = ("password", "token", "secret", "sasl_plain_password", "ssl_password")


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and any(s in key.lower() for s in SECRET_KEYS)


def _scrub(value: Any) -> Any:
    """`value` with the values of secret-named keys replaced, in nested dicts and lists too."""
    if isinstance(value, Mapping):
        return {k: "***" if _is_secret(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, tuple):  # exc_info tuples stay tuples
        return tuple(_scrub(v) for v in value)
    return value


def _redact(_logger: object, _name: str, event: dict) -> dict:
    """Never let a secret reach a log line, whatever a caller passes (a client config dict too)."""
    return _scrub(event)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process; `fmt` is auto|json|console."""
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # it logs every reconnect; we log outages ourselves
    # torchvision 0.29 says this at every decode_jpeg call (streamer/jpeg_batch.py says where to go next)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line: ranks sharing a log never interleave
        cache_logger_on_first_use=False,
    )
