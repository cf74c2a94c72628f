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


def link_secrets(config: GatewayConfig) -> list[bytes]:
    """The secrets that sign and verify links: configured ones, else the kept one."""
    configured = tracking_secrets(config.tracking)
    if configured:
        return configured
    return [load_or_create(Path(config.store.path).parent / KEY_FILE)]


def load_or_create(path: Path) -> bytes:
    """The secret in ``path``; a new random one written there (0600) if there is none."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
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
