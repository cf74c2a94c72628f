"""structlog configuration: JSON lines on stdout, personal data masked before rendering.

The gateway binds ``recipient_ref`` (a keyed hash) instead of addresses, so ``mask_pii`` is the
safety net, not the mechanism. Event names are stable snake_case facts (``dispatch_accepted``).
"""

from __future__ import annotations

import hashlib
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


def recipient_ref(tenant: str, recipient_id: str) -> str:
    """A short stable reference to a recipient for logs; not reversible without the id."""
    digest = hashlib.blake2b(f"{tenant}:{recipient_id}".encode(), digest_size=6, person=b"cgw-log")
    return digest.hexdigest()


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
