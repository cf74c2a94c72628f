"""structlog configuration: JSON lines on stdout, personal data masked before rendering.

Log events name messages by the CRM's ids and never carry recipients, addresses, tokens or
texts; ``mask_pii`` is the safety net should one be bound by mistake, not the mechanism. Event names are stable snake_case facts (``dispatch_accepted``).
"""

from __future__ import annotations

import logging
import sys
from typing import Final

import structlog
from structlog.typing import EventDict, WrappedLogger

PII_KEYS: Final = frozenset(
    {
        "phone",
        "email",
        "device_token",
        "push_token",
        "push_tokens",
        "viber_id",
        "body",
        "text",
        "html",
        "subject",
        "title",
        "address",
        "to",
        "recipient",
    }
)


def mask_pii(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in PII_KEYS & event_dict.keys():
        event_dict[key] = "<redacted>"
    return event_dict


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once per process. ``json=None`` picks JSON unless stdout is a TTY."""
    render_json = json if json is not None else not sys.stdout.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if render_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_pii,
            structlog.processors.dict_tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
