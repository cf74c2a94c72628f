"""The tracking secret when none is configured: made once, kept beside the journal.

Links in emails and SMS live for months; a secret that changed at every start would break
every unsubscribe link at the next restart. So an unset ``tracking.secret`` means "the one in
``tracking.key`` next to the journal", created on first start with mode 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog

from gateway.config import GatewayConfig, tracking_secrets
from gateway.core.errors import ConfigError

log = structlog.get_logger("gateway.keyfile")

KEY_FILE = "tracking.key"


def link_secrets(config: GatewayConfig, *, journal_is_new: bool) -> list[bytes]:
    """The secrets that sign and verify links: configured ones, else the kept one.

    A key is made only beside a new journal: next to an existing one, a missing key means it
    was lost, and a new one would silently break every unsubscribe link already sent.

    Raises:
        ConfigError: the key is missing beside an existing journal.
    """
    configured = tracking_secrets(config.tracking)
    if configured:
        return configured
    path = Path(config.store.path).parent / KEY_FILE
    return [load_or_create(path, create=journal_is_new)]


def load_or_create(path: Path, *, create: bool = True) -> bytes:
    """The secret in ``path``; a new random one written there (0600) if there is none and
    ``create`` allows it."""
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"{path} is missing beside an existing journal; restore it (every link in "
                "messages already sent depends on it), or set CASCADEGW__TRACKING__SECRET, or "
                "run `cascadegw init` to make a new one (old links then stop working)"
            ) from None
    secret = secrets.token_hex(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read(path)
    except PermissionError as exc:
        raise ConfigError(
            f"{path}: cannot write the tracking key ({exc.strerror}); make the data directory "
            "writable, or set CASCADEGW__TRACKING__SECRET"
        ) from exc
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())
    log.info("tracking_secret_created", path=str(path))
    return secret.encode()


def _read(path: Path) -> bytes:
    secret = path.read_text().strip().encode()
    if len(secret) < 16:
        raise ConfigError(f"{path}: the tracking secret needs at least 16 bytes")
    return secret
