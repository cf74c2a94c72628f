"""`make bench`: run every scenario against real processes and rewrite bench/RESULTS.md.

Each scenario starts the provider simulators (`cascadegw simulate`, their own process) and the
gateway (`cascadegw run`, optionally with worker processes), drives it with locust from the
bench virtualenv, samples CPU time and RSS of every process from /proc, and reads the
gateway's own metrics. Figures are printed and written; nothing is asserted: goals are
compared, not enforced (timed assertions belong to no test).

    .venv/bin/python bench/run.py [--quick] [--only admission,e2e,cascade,critical,pending]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ on the path, not its package
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    LOCUST,
    Metrics,
    Usage,
    free_port,
    free_port_block,
    gateway_command,
    kill_tree,
    locust_command,
    locust_environment,
    scrape,
    simulate_command,
    status_kib,
    tree_usage,
    wait_for,
    wait_ready,
    without_urls,
)
from gateway.runtime.cpu import CpuPart  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
TICK_MICROSECONDS = 1_000_000 / os.sysconf("SC_CLK_TCK")

CONFIG = """
[ingest]
bind = "tcp://127.0.0.1:{ingest_port}"
status_bind = "tcp://127.0.0.1:{status_port}"
max_batch = 1000
[http]
bind = "127.0.0.1:{http_port}"
public_bind = "127.0.0.1:{public_port}"
public_url = "http://127.0.0.1:{public_port}"
[store]
path = "{store}"
create = true
synchronous = "{synchronous}"
max_pending_rows = 1000000
[dispatch]
workers = 0
[dispatch.max_queued]
critical = 100000
normal = 3000000
bulk = 3000000
[simulator]
latency_seconds = 0.002
sendgrid_batch_seconds = 1.0
receipt_delay_seconds = 0.5
read_delay_seconds = 1.5
deliver_probability = 0.95
read_probability = 0.3
click_probability = 0.1
bounce_probability = 0.01
unsubscribe_probability = 0.0
[policy.consent]
unknown_advertising = "grant"
{quiet}
[diagnostics]
cpu_breakdown = {cpu_breakdown}
[providers.fcm_sim]
kind = "fcm"
url = "http://127.0.0.1:{sim_port_fcm}"
project_id = "bench"
rate_per_second = {rate}
burst = 200
concurrency = {concurrency}
[providers.sendgrid_sim]
kind = "sendgrid"
url = "http://127.0.0.1:{sim_port_sendgrid}"
price = 0.05
rate_per_second = {rate}
burst = 200
concurrency = {concurrency}
[providers.twilio_sim]
kind = "twilio"
url = "http://127.0.0.1:{sim_port_twilio}"
account_sid = "AC00000000000000000000000000000000"
price = 3.5
rate_per_second = {rate}
burst = 200
concurrency = {concurrency}
[providers.viber_sim]
kind = "viber"
url = "http://127.0.0.1:{sim_port_viber}"
price = 0.9
rate_per_second = {rate}
burst = 200
concurrency = {concurrency}
[tenants.demo]
brand = "Bench"
cascade = ["push", "email", "viber", "sms"]
providers = {{ push = ["fcm_sim"], email = ["sendgrid_sim"], viber = ["viber_sim"], sms = ["twilio_sim"] }}
"""
# every minute of the day but the last second is quiet for promos: admissions defer, no sends
QUIET_ALL_DAY = '[[policy.quiet_hours]]\nstart = 00:00:00\nend = 23:59:59\ncategories = ["promo"]\n'


# ---------------------------------------------------------------- the system under test
@dataclass
class Stack:
    directory: Path
    workers: int = 0
    synchronous: str = "normal"
    quiet: bool = False
    rate: int = 20000
    # the simulators answer in ~2 ms, so a few connections carry thousands of requests/s and
    # throughput scales with worker processes. (With httpx a larger pool also cost more CPU per
    # request; the adapters' own pool does not: bench/http_client_bench.py)
    concurrency: int = 8
    cpu_breakdown: bool = False
    """gateway_cpu_seconds_total{part}: a few percent of a send's CPU, so only where reported."""
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['ingest']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['public']}"

    def write_config(self, store: Path) -> Path:
        simulator_base = free_port_block(4)
        self.ports.update(
            ingest=free_port(),
            status=free_port(),
            http=free_port(),
            public=free_port(),
            simulators=simulator_base,
        )
        # `cascadegw simulate --port P` gives providers P, P+1, ... in sorted name order
        names = sorted(["fcm", "sendgrid", "twilio", "viber"])
        text = CONFIG.format(
            ingest_port=self.ports["ingest"],
            status_port=self.ports["status"],
            http_port=self.ports["http"],
            public_port=self.ports["public"],
            store=store,
            synchronous=self.synchronous,
            quiet=QUIET_ALL_DAY if self.quiet else "",
            cpu_breakdown="true" if self.cpu_breakdown else "false",
            rate=self.rate,
            concurrency=self.concurrency,
            **{f"sim_port_{name}": simulator_base + index for index, name in enumerate(names)},
        )
        path = self.directory / "gateway.toml"
        path.write_text(text)
        return path

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.write_config(self.directory / "journal.db")
        env_file = self.directory / "simulators.env.json"
        env_file.unlink(missing_ok=True)
        command = simulate_command(
            config,
            port=self.ports["simulators"],
            webhook_base=self.public_url,
            ingest=self.endpoint,
            env_out=env_file,
            log_level="error",
        )
        self.processes["simulators"] = self._spawn("simulators", command, os.environ)
        wait_for(env_file.exists, "simulators", timeout_seconds=60)
        self.environ = {**os.environ, **without_urls(json.loads(env_file.read_text()))}
        self.config = config
        self.start_gateway()

    def start_gateway(self) -> float:
        """Start the gateway; returns seconds until /readyz answered 200."""
        started = time.perf_counter()
        command = gateway_command(self.config, log_level="error", workers=self.workers)
        process = self._spawn("gateway", command, self.environ)
        self.processes["gateway"] = process
        wait_ready(self.http_url, process.poll, timeout_seconds=600)
        return time.perf_counter() - started

    def _spawn(
        self, name: str, command: list[str], environ: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                command, env=environ, stdout=log, stderr=log, cwd=self.directory
            )
        finally:
            log.close()

    def kill_gateway(self) -> None:
        process = self.processes.pop("gateway")
        kill_tree(process.pid)
        process.wait()

    def stop(self) -> None:
        for name in ("gateway", "simulators"):
            process = self.processes.pop(name, None)
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def usage(self) -> dict[str, Usage]:
        """Per process tree; ``router`` is the gateway's own process, without the ZeroMQ edge
        and workers below it."""
        usage = {name: tree_usage(process.pid) for name, process in self.processes.items()}
        if "gateway" in self.processes:
            usage["router"] = tree_usage(self.processes["gateway"].pid, alone=True)
        return usage

    def metrics(self) -> Metrics:
        return scrape(self.http_url)


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


# ---------------------------------------------------------------- load
@dataclass
class LoadResult:
    frames: int
    failures: int
    seconds: float
    p50_ms: float
    p99_ms: float
    batch: int

    @property
    def messages(self) -> int:
        return (self.frames - self.failures) * self.batch

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def locust(
    stack: Stack, *, users: int, seconds: float, batch: int, env: dict[str, str] | None = None
) -> LoadResult:
    environ = {**locust_environment(stack.endpoint, "demo", batch), **(env or {})}
    started = time.perf_counter()
    completed = subprocess.run(
        locust_command(
            users=users,
            run_time_seconds=int(seconds),
            stop_timeout_seconds=10,
            user_classes=["CrmUser"],
        ),
        env=environ,
        capture_output=True,
        check=False,
        cwd=stack.directory,
    )
    elapsed = time.perf_counter() - started
    try:
        entries = json.loads(completed.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"locust failed: {completed.stderr.decode()[-2000:]}") from exc
    frames = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    if not frames:  # a locustfile that raises sends nothing: a figure of 0 would look measured
        raise RuntimeError(f"locust sent no request: {completed.stderr.decode()[-2000:]}")
    histogram: dict[float, int] = {}
    first = min((e["start_time"] for e in entries), default=started)
    last = max((e["last_request_timestamp"] or first for e in entries), default=first)
    for entry in entries:
        for bucket, count in entry["response_times"].items():
            histogram[float(bucket)] = histogram.get(float(bucket), 0) + count
    return LoadResult(
        frames=frames,
        failures=failures,
        seconds=max(last - first, 0.001) if frames else elapsed,
        p50_ms=_percentile(histogram, 0.50),
        p99_ms=_percentile(histogram, 0.99),
        batch=batch,
    )


def _percentile(histogram: dict[float, int], fraction: float) -> float:
    total = sum(histogram.values())
    if not total:
        return 0.0
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= fraction * total:
            return value
    return max(histogram)


def cpu_per_message(
    before: dict[str, Usage], after: dict[str, Usage], messages: int
) -> dict[str, float]:
    return {
        name: (after[name].cpu_ticks - before[name].cpu_ticks)
        * TICK_MICROSECONDS
        / max(messages, 1)
        for name in after
        if name in before
    }


# ---------------------------------------------------------------- scenarios
@dataclass
class Report:
    sections: list[str] = field(default_factory=list)

    def table(self, title: str, note: str, header: list[str], rows: list[list[str]]) -> None:
        lines = [
            f"## {title}",
            "",
            note,
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


def _cpu_cell(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:,.0f}" for name, value in cpu.items())


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def scenario_admission(report: Report, work: Path, quick: bool) -> None:
    rows = []
    seconds = 8 if quick else 15
    for synchronous in ("normal", "full"):
        for batch, users in ((1, 48), (10, 24), (100, 8)):
            stack = Stack(
                work / f"admission-{synchronous}-{batch}", synchronous=synchronous, quiet=True
            )
            with running(stack):
                before = stack.usage()
                result = locust(stack, users=users, seconds=seconds, batch=batch)
                after = stack.usage()
                half = None
                if batch == 100:
                    # the latency goal is stated at half the measured throughput
                    rate = result.messages_per_second / 2 / batch / users
                    half = locust(
                        stack,
                        users=users,
                        seconds=seconds,
                        batch=batch,
                        env={"CASCADEGW_FRAMES_PER_SECOND": f"{rate:.3f}"},
                    )
            cpu = cpu_per_message(before, after, result.messages)
            rows.append(
                [
                    synchronous,
                    str(batch),
                    f"{result.messages_per_second:,.0f}",
                    f"{result.p50_ms:.0f}",
                    f"{result.p99_ms:.0f}",
                    f"{half.messages_per_second:,.0f} / {half.p99_ms:.0f}" if half else "-",
                    _cpu_cell(cpu),
                    _mib(after["gateway"].peak_rss_bytes),
                    str(result.failures),
                ]
            )
    report.table(
        "Admission only (durable acks, deferred by quiet hours: no provider traffic)",
        "Goal: >= 100,000 durable admissions/s per router process at batch 100; p99 ack <= 25 ms at half that rate. "
        "One locust process generates the load (8 users at batch 100).",
        [
            "synchronous",
            "batch",
            "msgs/s",
            "p50 ack ms",
            "p99 ack ms",
            "at half rate: msgs/s / p99 ms",
            "CPU µs per message",
            "gateway peak RSS MiB",
            "failed frames",
        ],
        rows,
    )


def scenario_e2e(report: Report, work: Path, quick: bool) -> None:
    rows = []
    seconds = 10 if quick else 20
    # 250/s is about what this stack sustains on two slow cores (its latency is the least
    # loaded one here); the higher rates show how the backlog grows
    for workers, offers in ((0, (250, 1000, 2500)), (2, (1000, 2500))):
        for offered in offers:
            stack = Stack(work / f"e2e-{workers}-{offered}", workers=workers, cpu_breakdown=True)
            with running(stack):
                metrics_before = stack.metrics()
                before = stack.usage()
                # paced: 8 users x 50 messages per frame at the rate that offers `offered`/s
                pace = {"CASCADEGW_FRAMES_PER_SECOND": f"{offered / 8 / 50:.3f}"}
                result = locust(stack, users=8, seconds=seconds, batch=50, env=pace)
                after = stack.usage()
                metrics_after = stack.metrics()
            sends = _delta(metrics_before, metrics_after, "gateway_sends_total", **_PUSH_SENDS)
            cpu = cpu_per_message(before, after, int(sends))
            parts = {
                part.value: _delta(metrics_before, metrics_after, _CPU_PARTS, part=part.value)
                * 1e6
                / max(sends, 1.0)
                for part in CpuPart
            }
            p99 = metrics_after.bucket_bound(_ACCEPT_TO_SEND, 0.99, lane="normal")
            backlog = metrics_after.total("gateway_queue_depth", lane="normal")
            rows.append(
                [
                    "single process" if not workers else f"{workers} worker processes",
                    f"{offered:,}",
                    f"{result.messages_per_second:,.0f}",
                    f"{sends / result.seconds:,.0f}",
                    f"{backlog:,.0f}",
                    f"{p99 * 1000:.0f}" if p99 is not None else "-",
                    _cpu_cell(cpu),
                    _cpu_cell({name: value for name, value in parts.items() if value >= 0.5}),
                    ", ".join(f"{n} {_mib(u.peak_rss_bytes)}" for n, u in after.items()),
                ]
            )
    report.table(
        "End-to-end first-step sends (push through the FCM simulator, receipts on)",
        "Goal: >= 2,000 end-to-end first-step sends/s on this 2-core machine, simulators included. "
        "Load is paced at the offered rate; what the providers did not take is still queued at the end. "
        "CPU: `gateway` is the router with the ZeroMQ edge and any workers, `router` its own process; "
        "its parts come from gateway_cpu_seconds_total (diagnostics.cpu_breakdown, on here, "
        "costs a few percent of a send).",
        [
            "dispatch",
            "offered msgs/s",
            "admitted msgs/s",
            "first-step sends/s",
            "queued at the end",
            "p99 accept->sent ms (bucket bound)",
            "CPU µs per send",
            "router CPU µs per send, by part",
            "peak RSS MiB",
        ],
        rows,
    )


_CPU_PARTS = "gateway_cpu_seconds_total"
_PUSH_SENDS = {"channel": "push", "provider": "fcm_sim", "result": "ok"}
_ACCEPT_TO_SEND = "gateway_accept_to_send_seconds"


def scenario_cascade(report: Report, work: Path, quick: bool) -> None:
    stack = Stack(work / "cascade")
    seconds = 10 if quick else 20
    with running(stack):
        before_metrics = stack.metrics()
        before = stack.usage()
        result = locust(
            stack,
            users=4,
            seconds=seconds,
            batch=50,
            env={
                "CASCADEGW_STEP_TIMEOUTS": "push=1,email=2,viber=2,sms=4",
                "CASCADEGW_FRAMES_PER_SECOND": "1.5",  # 4 x 50 x 1.5 = 300 messages/s,
            },
        )
        time.sleep(12)  # the cascades play out: 1 + 2 + 2 + 4 s of timeouts plus receipts
        after = stack.usage()
        metrics = stack.metrics()
    sends = {
        channel: _delta(
            before_metrics,
            metrics,
            "gateway_cascade_steps_total",
            channel=channel,
            result="sent",
        )
        for channel in ("push", "email", "viber", "sms")
    }
    outcomes = {
        outcome: metrics.total("gateway_cascade_outcomes_total", outcome=outcome)
        for outcome in ("read", "clicked", "delivered", "exhausted")
    }
    total_sends = sum(sends.values())
    cpu = cpu_per_message(before, after, result.messages)
    report.table(
        "Full cascade with read probabilities (read 30%, click 10%, deliver 95%)",
        f"{result.messages:,} messages at {result.messages_per_second:,.0f}/s; step timeouts shortened per message "
        "(push 1 s, email 2 s, Viber 2 s, SMS 4 s).",
        [
            "sent on push",
            "email",
            "viber",
            "sms",
            "sends per message",
            "finished read / clicked / delivered / exhausted",
            "CPU µs per message",
        ],
        [
            [
                *(f"{sends[c]:,.0f}" for c in ("push", "email", "viber", "sms")),
                f"{total_sends / max(result.messages, 1):.2f}",
                " / ".join(
                    f"{outcomes[o]:,.0f}" for o in ("read", "clicked", "delivered", "exhausted")
                ),
                _cpu_cell(cpu),
            ]
        ],
    )


def scenario_critical(report: Report, work: Path, quick: bool) -> None:
    bulk_messages = 100_000 if quick else 1_000_000
    # providers are throttled to 500/s so the bulk campaign keeps draining for the whole run
    stack = Stack(work / "critical", rate=500)
    with running(stack):
        bulk = locust(
            stack,
            users=8,
            seconds=900,
            batch=500,
            env={"CASCADEGW_PRIORITY": "bulk", "CASCADEGW_MAX_MESSAGES": str(bulk_messages)},
        )
        queued = stack.metrics().total("gateway_queue_depth", lane="bulk")
        critical = locust(
            stack,
            users=2,
            seconds=20,
            batch=1,
            env={"CASCADEGW_PRIORITY": "critical", "CASCADEGW_FRAMES_PER_SECOND": "10"},
        )
        metrics = stack.metrics()
        still_queued = metrics.total("gateway_queue_depth", lane="bulk")
        rss = stack.usage()["gateway"].peak_rss_bytes
    p99 = metrics.bucket_bound(_ACCEPT_TO_SEND, 0.99, lane="critical")
    p50 = metrics.bucket_bound(_ACCEPT_TO_SEND, 0.50, lane="critical")
    report.table(
        "Critical lane while a bulk campaign drains",
        f"Goal: p99 accept->provider request <= 100 ms for critical messages while a bulk campaign of >= 1M drains. "
        f"Bulk: {bulk.messages:,} messages admitted at {bulk.messages_per_second:,.0f}/s; providers limited to 500 requests/s.",
        [
            "bulk queued when critical traffic started",
            "bulk still queued after",
            "critical messages",
            "critical accept->sent p50 / p99 ms (bucket bound)",
            "critical ack p99 ms",
            "gateway peak RSS MiB",
        ],
        [
            [
                f"{queued:,.0f}",
                f"{still_queued:,.0f}",
                f"{critical.messages:,}",
                f"{(p50 or 0) * 1000:.0f} / {(p99 or 0) * 1000:.0f}",
                f"{critical.p99_ms:.0f}",
                _mib(rss),
            ]
        ],
    )


def scenario_pending(report: Report, work: Path, quick: bool) -> None:
    pending = 100_000 if quick else 1_000_000
    stack = Stack(work / "pending")
    with running(stack):
        idle = stack.usage()["gateway"].rss_bytes
        load = locust(
            stack,
            users=8,
            seconds=900,
            batch=500,
            env={"CASCADEGW_SEND_AT": "86400", "CASCADEGW_MAX_MESSAGES": str(pending)},
        )
        time.sleep(2)
        loaded = stack.usage()["gateway"].rss_bytes
        active = stack.metrics().total("gateway_active_cascades")
        stack.kill_gateway()
        restart_seconds = stack.start_gateway()
        recovered = stack.metrics().total("gateway_active_cascades")
        after_restart = stack.usage()["gateway"].rss_bytes
    per_cascade = (loaded - idle) / max(active, 1)
    report.table(
        f"{pending:,} pending cascades (deferred a day)",
        "Goals: <= 1 KB of RSS per pending cascade; restart with 1M pending <= 30 s (SIGKILL, then start until /readyz).",
        [
            "admitted",
            "admission msgs/s",
            "RSS idle / loaded MiB",
            "bytes per pending cascade",
            "restart to ready s",
            "recovered",
            "RSS after restart MiB",
        ],
        [
            [
                f"{active:,.0f}",
                f"{load.messages_per_second:,.0f}",
                f"{_mib(idle)} / {_mib(loaded)}",
                f"{per_cascade:,.0f}",
                f"{restart_seconds:.1f}",
                f"{recovered:,.0f}",
                _mib(after_restart),
            ]
        ],
    )


def _delta(before: Metrics, after: Metrics, name: str, /, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


SCENARIOS = {
    "admission": scenario_admission,
    "e2e": scenario_e2e,
    "cascade": scenario_cascade,
    "critical": scenario_critical,
    "pending": scenario_pending,
}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = (status_kib(Path("/proc/meminfo").read_text(), "MemTotal") or 0) / 2**20
    return f"{os.cpu_count()} x {cpu}, {memory:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="smaller volumes (a smoke run, not for RESULTS.md)"
    )
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, journals)"
    )
    args = parser.parse_args()
    if not Path(LOCUST).exists():
        sys.exit("the locust virtualenv is missing: run `make bench-env`")
    work = Path(tempfile.mkdtemp(prefix="cascadegw-bench-"))
    report = Report()
    started = time.perf_counter()
    try:
        for name in args.only.split(","):
            SCENARIOS[name](report, work, args.quick)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    elapsed = time.perf_counter() - started
    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` (bench/run.py) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} minutes"
        f"{' (quick run)' if args.quick else ''}.\n\nMachine: {machine()}.\n\n"
        "Every process is real: the gateway (`cascadegw run`), the provider simulators (`cascadegw simulate`, their own "
        "process, speaking the providers' HTTP APIs) and locust (`bench/locustfile.py`). CPU is utime + stime from "
        "/proc per process tree (gateway includes its worker processes), per message admitted or per provider send. "
        "Figures vary ±20-30% run to run on shared machines.\n\n"
    )
    if not args.quick:
        RESULTS.write_text(header + "\n".join(report.sections))
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
