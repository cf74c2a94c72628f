"""Running the real `cascadegw` command in a subprocess, against simulators in the test process.

Ports, command lines, readiness and /proc readings come from bench/harness.py, the harness
`make bench` uses too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import trio

from bench.harness import (
    POLL_INTERVAL_SECONDS,
    answers_ok,
    credentials_env,
    descendants,
    free_port,
    gateway_command,
    kill_tree,
    rss_bytes_of,
)
from gateway.client import Client, status_request

__all__ = [
    "GatewayProcess",
    "Standalone",
    "credentials_env",
    "edge_pids",
    "free_port",
    "rss_bytes_of",
    "standalone_config",
    "wait_answering",
    "wait_finished",
]
STATUS_CHUNK = 200  # status requests per frame


async def wait_answering(
    url: str, process: trio.Process, what: str, *, timeout_seconds: float
) -> None:
    """Poll ``url`` until it answers 200; fail as soon as ``process`` exits, or at the deadline."""
    with trio.fail_after(timeout_seconds):
        # the probe is blocking httpx: in a thread, so simulators in this process keep serving
        while not await trio.to_thread.run_sync(answers_ok, url):
            if process.returncode is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}")
            await trio.sleep(POLL_INTERVAL_SECONDS)


def edge_pids(router_pid: int, role: str = "requests") -> list[int]:
    """The ZeroMQ edge processes of ``role`` (requests, status) below the router: one, or its
    restarted successor."""
    found = []
    for pid in descendants(router_pid)[1:]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        if b"gateway.runtime.edge\0" + role.encode() in command:
            found.append(pid)
    return found


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
        command = gateway_command(self.config_path, log_level=self.log_level)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = await trio.lowlevel.open_process(
                command, env=self.environ, stdout=log, stderr=log, preexec_fn=self.preexec
            )
        await self.wait_ready()

    async def wait_ready(self, timeout_seconds: float = 30.0) -> None:
        assert self.process is not None
        what = f"the gateway (log: {self.log_path})"
        await wait_answering(
            f"{self.http_url}/readyz", self.process, what, timeout_seconds=timeout_seconds
        )

    async def kill(self) -> None:
        """SIGKILL the gateway and any worker processes, as a crash leaves them."""
        assert self.process is not None
        kill_tree(self.process.pid)
        await self.process.wait()

    async def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        with trio.fail_after(30):
            return await self.process.wait()


class Standalone(NamedTuple):
    path: Path
    http_url: str
    """The admin server: metrics, health, the admin API."""
    ingest: str
    public_url: str
    """The public server: webhooks and tracking links."""


def standalone_config(
    tmp_path: Path,
    *,
    extra: str = "",
    store_extra: str = "",
    http_extra: str = "",
    ingest_extra: str = "",
) -> Standalone:
    """A config file for ``cascadegw run`` with its own simulators, on free ports."""
    http_port, ingest_port, status_port = free_port(), free_port(), free_port()
    public_port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[ingest]
bind = "tcp://127.0.0.1:{ingest_port}"
status_bind = "tcp://127.0.0.1:{status_port}"
{ingest_extra}
[http]
bind = "127.0.0.1:{http_port}"
public_bind = "127.0.0.1:{public_port}"
public_url = "http://127.0.0.1:{public_port}"
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
    return Standalone(
        path,
        f"http://127.0.0.1:{http_port}",
        f"tcp://127.0.0.1:{ingest_port}",
        f"http://127.0.0.1:{public_port}",
    )


def wait_finished(
    endpoint: str, tenant: str, message_ids: Collection[str], *, timeout_seconds: float
) -> dict[str, Any]:
    """Poll the status of ``message_ids`` until every cascade has finished, or the deadline.

    Blocking (run it in a thread). Returns the last state seen of each message: its
    ``message`` object, or the whole reply when the gateway knows no such message.
    """
    deadline = time.monotonic() + timeout_seconds
    pending = set(message_ids)
    states: dict[str, Any] = {}
    with Client(endpoint, timeout_seconds=10) as client:
        while True:
            order = sorted(pending)
            for start in range(0, len(order), STATUS_CHUNK):
                chunk = order[start : start + STATUS_CHUNK]
                replies = client.request([status_request(m, tenant) for m in chunk])
                for message_id, reply in zip(chunk, replies, strict=True):
                    states[message_id] = reply.get("message") or reply
                    if states[message_id].get("state") == "finished":
                        pending.discard(message_id)
            if not pending or time.monotonic() >= deadline:
                return states
            time.sleep(0.5)  # a poll interval: the loop ends on the condition or the deadline
