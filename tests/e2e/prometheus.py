"""A real Prometheus for the tests: the Debian package, installed by the test setup if missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.e2e.processes import free_port, wait_answering

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def ensure_prometheus() -> None:
    """Install Debian's `prometheus` package when the binaries are missing.

    Never a skip: without Prometheus these tests cannot prove what they are for, so a failed
    install fails them.
    """
    if os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError("Prometheus is missing and there is no apt-get to install it")
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=environ, check=False, capture_output=True).returncode != 0:
        subprocess.run([apt, "update", "-q"], env=environ, check=True, capture_output=True)
        subprocess.run(install, env=environ, check=True, capture_output=True)


@asynccontextmanager
async def running_prometheus(tmp_path: Path, *, target: str, rules: Path) -> AsyncIterator[str]:
    """Prometheus scraping ``target`` (host:port) every second, with ``rules`` loaded; yields its URL."""
    ensure_prometheus()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        f"scrape_configs:\n  - job_name: cascadegw\n    static_configs:\n      - targets: ['{target}']\n"
    )
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("ab") as log:
        process = await trio.lowlevel.open_process(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        what = f"prometheus (log: {tmp_path / 'prometheus.log'})"
        await wait_answering(f"{url}/-/ready", process, what, timeout_seconds=60)
        yield url
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
