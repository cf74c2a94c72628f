"""bench/harness.py, which `make bench` and the end-to-end tests read their figures with."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.harness import (
    Metrics,
    NotReady,
    descendants,
    free_port,
    kill_tree,
    tree_usage,
    wait_for,
    wait_ready,
    without_urls,
)


def exposition() -> str:
    """A page as the gateway's registry writes it: labelled counters, a gauge, a histogram."""
    registry = CollectorRegistry()
    sends = Counter("gateway_sends", "Sends.", ["channel", "result"], registry=registry)
    sends.labels("push", "ok").inc(7)
    sends.labels("email", "ok").inc(3)
    sends.labels("email", "failed").inc(1)
    Gauge("gateway_active_cascades", "Active.", registry=registry).set(42)
    latency = Histogram(
        "gateway_accept_to_send_seconds",
        "Latency.",
        ["lane"],
        buckets=(0.01, 0.1, 1.0),
        registry=registry,
    )
    for seconds in [0.005] * 90 + [0.05] * 9 + [0.5]:
        latency.labels("normal").observe(seconds)
    latency.labels("bulk")  # a series with no observations yet
    return generate_latest(registry).decode()


class TestMetrics:
    def test_a_series_by_its_exact_labels(self) -> None:
        metrics = Metrics.parse(exposition())
        assert 7.0 == metrics.sample("gateway_sends_total", channel="push", result="ok")
        assert 42.0 == metrics.sample("gateway_active_cascades")
        assert metrics.sample("gateway_sends_total", channel="push") is None  # not exact
        assert metrics.sample("gateway_sends_total", channel="sms", result="ok") is None

    def test_a_total_over_the_series_carrying_some_labels(self) -> None:
        metrics = Metrics.parse(exposition())
        assert 4.0 == metrics.total("gateway_sends_total", channel="email")
        assert 11.0 == metrics.total("gateway_sends_total")
        assert 0.0 == metrics.total("gateway_queue_depth", lane="bulk")

    def test_the_bucket_that_holds_a_quantile(self) -> None:
        metrics = Metrics.parse(exposition())
        name = "gateway_accept_to_send_seconds"
        assert 0.01 == metrics.bucket_bound(name, 0.50, lane="normal")
        assert 0.1 == metrics.bucket_bound(name, 0.99, lane="normal")
        assert 1.0 == metrics.bucket_bound(name, 1.0, lane="normal")
        assert metrics.bucket_bound(name, 0.99, lane="bulk") is None
        assert metrics.bucket_bound(name, 0.99, lane="critical") is None


class TestProcesses:
    def test_a_tree_is_found_measured_and_killed(self) -> None:
        # a shell that waits on a child of its own, as a router waits on its workers
        parent = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & wait"])
        try:
            wait_for(lambda: len(descendants(parent.pid)) == 2, "the child", timeout_seconds=30)
            tree = descendants(parent.pid)
            usage = tree_usage(parent.pid)
        finally:
            kill_tree(parent.pid)
            exit_code = parent.wait(timeout=10)
        assert -signal.SIGKILL == exit_code
        assert parent.pid == tree[0]
        wait_for(lambda: gone(tree[1]), "the child's end", timeout_seconds=30)
        assert usage.rss_bytes > 0
        assert usage.peak_rss_bytes >= usage.rss_bytes

    def test_a_gateway_that_exits_is_not_waited_for(self) -> None:
        exited = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        with pytest.raises(NotReady, match="exited with 3"):
            wait_ready(f"http://127.0.0.1:{free_port()}", exited.poll, timeout_seconds=60)


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie not yet reaped by its new parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_credentials_travel_without_the_urls() -> None:
    environ = {
        "CASCADEGW__PROVIDERS__SMS1__URL": "http://127.0.0.1:1",
        "CASCADEGW__PROVIDERS__SMS1__AUTH_TOKEN": "secret",
    }
    assert {"CASCADEGW__PROVIDERS__SMS1__AUTH_TOKEN": "secret"} == without_urls(environ)
