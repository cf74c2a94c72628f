"""Running the real `cascadegw` command in a subprocess, against simulators in the test process."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import trio

from adapters.simulators._base import Simulator
from gateway.config import ENV_PREFIX, Secret


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def credentials_env(name: str, simulator: Simulator) -> dict[str, str]:
    """A simulator's credentials as the environment variables a gateway process reads."""
    environ = {}
    for key, value in simulator.credentials().items():
        variable = f"{ENV_PREFIX}PROVIDERS__{name.upper()}__{key.upper()}"
        environ[variable] = value.reveal() if isinstance(value, Secret) else json.dumps(value)
    return environ


class GatewayProcess:
    """``python -m gateway run`` with a config file and extra environment.

    ``preexec`` runs in the child before it starts (e.g. to set a resource limit).
    """

    def __init__(
        self,
        config_path: Path,
        environ: Mapping[str, str],
        http_url: str,
        *,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self.environ = {**os.environ, **environ}
        self.http_url = http_url
        self.preexec = preexec
        self.process: trio.Process | None = None
        self.log_path = config_path.with_suffix(".log")
        self.log_level = "warning"

    async def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(self.config_path),
            "run",
            "--log-level",
            self.log_level,
        ]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = await trio.lowlevel.open_process(
                command, env=self.environ, stdout=log, stderr=log, preexec_fn=self.preexec
            )
        await self.wait_ready()

    async def wait_ready(self, timeout_seconds: float = 30.0) -> None:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(timeout_seconds):
                while True:
                    assert self.process is not None
                    if self.process.returncode is not None:
                        raise RuntimeError(
                            f"gateway exited with {self.process.returncode}; see {self.log_path}"
                        )
                    try:
                        if (await client.get(f"{self.http_url}/readyz")).status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        with trio.fail_after(30):
            return await self.process.wait()


def rss_bytes_of(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def standalone_config(
    tmp_path: Path, *, extra: str = "", store_extra: str = "", http_extra: str = ""
) -> tuple[Path, str, str]:
    """A config file for ``cascadegw run`` with its own simulators, on free ports.

    Returns the file, the HTTP URL and the ZeroMQ ingest endpoint.
    """
    http_port, ingest_port, status_port = free_port(), free_port(), free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[ingest]
bind = "tcp://127.0.0.1:{ingest_port}"
status_bind = "tcp://127.0.0.1:{status_port}"
[http]
bind = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
{http_extra}
[store]
path = "{tmp_path / "var" / "journal.db"}"
synchronous = "normal"
{store_extra}
[simulator]
latency_seconds = 0.001
read_probability = 0.0
unsubscribe_probability = 0.0
[policy.consent]
unknown_advertising = "grant"
[providers.email1]
kind = "sendgrid"
simulated = true
rate_per_second = 5000
burst = 500
[providers.sms1]
kind = "twilio"
simulated = true
account_sid = "ACtest00000000000000000000000000000"
rate_per_second = 5000
burst = 500
[tenants.acme]
brand = "Acme"
cascade = ["email", "sms"]
providers = {{ email = ["email1"], sms = ["sms1"] }}
{extra}
"""
    )
    return path, f"http://127.0.0.1:{http_port}", f"tcp://127.0.0.1:{ingest_port}"
