"""The process harness `bench/run.py` and the end-to-end tests (tests/e2e) share.

Free ports, the `cascadegw` and locust command lines, waiting until a process answers,
provider credentials as environment variables, CPU and memory of a process tree from /proc,
and the gateway's /metrics read with prometheus_client's own parser.

Neither pytest nor locust is imported here: the tests import this module, and locust
gevent-patches whatever imports it, so it only ever runs as a subprocess of its own
virtualenv (`make bench-env`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters.simulators._base import Simulator
from gateway.config import ENV_PREFIX, Secret

ROOT = Path(__file__).resolve().parents[1]
LOCUST = ROOT / ".bench-venv" / "bin" / "locust"
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
POLL_INTERVAL_SECONDS = 0.05


# ---------------------------------------------------------------- ports
def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel handed out for
    ``bind(0)`` is also its pick for the next outgoing connection, and a test's gateway once
    found its admin port taken by one between the probe and its own bind."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(20_000, max(20_001, low))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        chosen: int = probe.getsockname()[1]
        return chosen


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return int(low), int(high)


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports after it (`cascadegw simulate` takes a run of them)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        probes: list[socket.socket] = []
        try:
            for offset in range(count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise RuntimeError("no block of free ports")


# ---------------------------------------------------------------- command lines
def gateway_command(config_path: Path, *, log_level: str, workers: int = 0) -> list[str]:
    """`cascadegw run` from the interpreter running this (the project's virtualenv)."""
    command = [
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config_path),
        "run",
        "--log-level",
        log_level,
    ]
    if workers:
        command += ["--workers", str(workers)]
    return command


def simulate_command(
    config_path: Path, *, port: int, webhook_base: str, ingest: str, env_out: Path, log_level: str
) -> list[str]:
    """`cascadegw simulate`: the config's providers on ``port``, ``port + 1``, ... by sorted name;
    the credentials they expect are written to ``env_out`` as JSON once they listen."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config_path),
        "simulate",
        "--port",
        str(port),
        "--webhook-base",
        webhook_base,
        "--ingest",
        ingest,
        "--env-out",
        str(env_out),
        "--log-level",
        log_level,
    ]


def locust_command(
    *, users: int, run_time_seconds: int, stop_timeout_seconds: int, user_classes: Sequence[str]
) -> list[str]:
    """Headless locust on bench/locustfile.py, every user started at once, a JSON summary on
    stdout (one entry per request name)."""
    return [
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        f"{run_time_seconds}s",
        "--stop-timeout",
        str(stop_timeout_seconds),
        "--json",
        "--only-summary",
        *user_classes,
    ]


def locust_environment(endpoint: str, tenant: str, batch: int) -> dict[str, str]:
    """The locustfile's settings (its docstring lists the others) on top of this environment."""
    return {
        **os.environ,
        "CASCADEGW_ENDPOINT": endpoint,
        "CASCADEGW_TENANT": tenant,
        "CASCADEGW_BATCH": str(batch),
    }


# ---------------------------------------------------------------- provider credentials
def credentials_env(name: str, simulator: Simulator) -> dict[str, str]:
    """A simulator's credentials as the environment variables a gateway process reads."""
    environ = {}
    for key, value in simulator.credentials().items():
        variable = f"{ENV_PREFIX}PROVIDERS__{name.upper()}__{key.upper()}"
        environ[variable] = value.reveal() if isinstance(value, Secret) else json.dumps(value)
    return environ


def without_urls(environ: Mapping[str, str]) -> dict[str, str]:
    """Provider settings minus their URLs: the config file names the URLs (on the ports it
    chose), the environment carries only the secrets and ids."""
    return {key: value for key, value in environ.items() if not key.endswith("__URL")}


# ---------------------------------------------------------------- waiting
class NotReady(RuntimeError):
    """A process exited, or did not answer, before its deadline."""


def wait_for(condition: Callable[[], bool], what: str, *, timeout_seconds: float) -> None:
    """Poll ``condition`` until it holds; NotReady once ``timeout_seconds`` have passed."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} did not come up in {timeout_seconds} s")
        time.sleep(POLL_INTERVAL_SECONDS)


def answers_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 now (False while nothing listens yet)."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(
    http_url: str, exit_code: Callable[[], int | None], *, timeout_seconds: float
) -> None:
    """Wait until the gateway at ``http_url`` answers /readyz with 200.

    ``exit_code`` polls its process (``Popen.poll``): a gateway that exits while starting
    raises NotReady at once instead of at the deadline.
    """

    def ready() -> bool:
        code = exit_code()
        if code is not None:
            raise NotReady(f"the process exited with {code} before {http_url} was ready")
        return answers_ok(f"{http_url}/readyz")

    wait_for(ready, f"{http_url}/readyz", timeout_seconds=timeout_seconds)


# ---------------------------------------------------------------- /proc
@dataclass
class Usage:
    cpu_ticks: int
    rss_bytes: int
    peak_rss_bytes: int


def status_kib(status: str, key: str) -> int | None:
    """A ``key:  N kB`` line of /proc/<pid>/status or /proc/meminfo, in KiB."""
    match = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (worker and webhook processes), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def tree_usage(pid: int, *, alone: bool = False) -> Usage:
    """CPU ticks and RSS of a process and all its descendants (workers, webhook processes,
    the ZeroMQ edge), or of the process ``alone``."""
    ticks = rss = peak = 0
    for member in [pid] if alone else descendants(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
        # a zombie has no memory lines
        rss += (status_kib(status, "VmRSS") or 0) * 1024
        peak += (status_kib(status, "VmHWM") or 0) * 1024
    return Usage(ticks, rss, peak)


def rss_bytes_of(pid: int) -> int:
    """Resident set size of one process."""
    kib = status_kib(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
    if kib is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return kib * 1024


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, as a crash would leave them.

    The whole tree is stopped first: killed one by one, a parent could see its child die
    and act on it in between (exit normally, restart a worker) instead of being killed."""
    tree = descendants(pid)
    for signal_number in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal_number)


# ---------------------------------------------------------------- /metrics
@dataclass(frozen=True)
class Metrics:
    """One scrape of a Prometheus text page: each sample's labels and value, by sample name
    (``gateway_sends_total``, ``gateway_accept_to_send_seconds_bucket``, ...)."""

    samples: Mapping[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return cls(samples)

    def sample(self, name: str, /, **labels: str) -> float | None:
        """The value of the series with exactly these labels; None when there is none."""
        for found, value in self.samples.get(name, []):
            if found == labels:
                return value
        return None

    def total(self, name: str, /, **labels: str) -> float:
        """The sum over every series carrying these labels (and any others); 0.0 for none."""
        return sum(value for found, value in self._matching(name, labels))

    def bucket_bound(self, name: str, fraction: float, /, **labels: str) -> float | None:
        """Upper bound of the histogram bucket that holds the ``fraction`` quantile (the
        bucket Prometheus' histogram_quantile interpolates in); None with no observations."""
        buckets = sorted(
            (float(found["le"]), value) for found, value in self._matching(f"{name}_bucket", labels)
        )
        if not buckets or not buckets[-1][1]:
            return None
        count = buckets[-1][1]
        for upper, cumulative in buckets:
            if cumulative >= fraction * count:
                return upper
        return None

    def _matching(self, name: str, labels: Mapping[str, str]) -> list[tuple[dict[str, str], float]]:
        return [
            (found, value)
            for found, value in self.samples.get(name, [])
            if labels.items() <= found.items()
        ]


def scrape(http_url: str) -> Metrics:
    """The gateway's /metrics, parsed."""
    response = httpx.get(f"{http_url}/metrics", timeout=10)
    response.raise_for_status()
    return Metrics.parse(response.text)
