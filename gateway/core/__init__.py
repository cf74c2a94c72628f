"""The pure core: policy, consent, caps, quiet hours, control group, rate limits, cascade, timers.

Nothing here performs I/O, reads a clock or imports trio, zmq, httpx, structlog or
prometheus_client; the import-linter contract in ``pyproject.toml`` enforces it. Time arrives
as ``now`` (POSIX seconds) from the runtime.
"""
