"""What an operator meets: one line naming the cause and the key to change, exit code 2;
Ctrl-C stops quietly; the commands work from any directory on the built-in default.

Against the installed ``cascadegw`` command, in a temporary HOME.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness
from gateway.config import default_config_bytes
from tests.e2e.processes import free_port

pytestmark = pytest.mark.slow  # every test runs the installed command in a process of its own

CASCADEGW = str(Path(sys.executable).with_name("cascadegw"))


def environment(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), **extra}


def run(
    args: list[str], home: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASCADEGW, *args],
        env=environment(home, **(extra or {})),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_exit_2(done: subprocess.CompletedProcess[str]) -> str:
    assert 2 == done.returncode, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 == len(lines), done.stderr
    return lines[0]


def free_ports(home: Path) -> dict[str, str]:
    """Environment overrides putting every listener of the built-in config on free ports."""
    http = free_port()
    return {
        "CASCADEGW__INGEST__BIND": f"tcp://127.0.0.1:{free_port()}",
        "CASCADEGW__INGEST__STATUS_BIND": f"tcp://127.0.0.1:{free_port()}",
        "CASCADEGW__HTTP__BIND": f"127.0.0.1:{http}",
        "CASCADEGW__HTTP__PUBLIC_URL": f"http://127.0.0.1:{http}",
    }


class TestFromAnyDirectory:
    def test_check_config_and_run_from_the_root_directory(self, tmp_path: Path) -> None:
        checked = run(["check-config"], tmp_path)
        assert 0 == checked.returncode, checked.stderr
        data = tmp_path / ".local" / "state" / "cascadegw"
        assert str(data / "cascadegw.db") in checked.stdout
        ports = free_ports(tmp_path)
        process = subprocess.Popen(
            [CASCADEGW, "run"],
            env=environment(tmp_path, **ports),
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            url = ports["CASCADEGW__HTTP__PUBLIC_URL"]
            ready = wait_ready(url, process)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert ready
        assert 0 == process.returncode, err
        assert "Traceback" not in err
        assert (data / "cascadegw.db").exists()
        for name in ("requests (ZeroMQ ROUTER)", "status events", "simulated fcm provider"):
            assert name in out
        assert "/_sim/script" in out


def wait_ready(url: str, process: subprocess.Popen[str]) -> bool:
    """Whether the gateway answered /readyz within a minute (False if it exited first)."""
    try:
        harness.wait_ready(url, process.poll, timeout_seconds=60)
    except harness.NotReady:
        return False
    return True


class TestOneLineErrors:
    @pytest.mark.parametrize("key", ["CASCADEGW__HTTP__BIND", "CASCADEGW__INGEST__BIND"])
    def test_a_port_in_use(self, key: str, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            ports = free_ports(tmp_path)
            ports[key] = f"127.0.0.1:{port}" if "HTTP" in key else f"tcp://127.0.0.1:{port}"
            line = one_line_exit_2(run(["run"], tmp_path, ports))
        assert "address already in use" in line
        assert key in line

    def test_a_webhook_bind_on_the_admin_port(self, tmp_path: Path) -> None:
        """The reviewer's case: check-config and run refuse it, before anything listens."""
        ports = free_ports(tmp_path)
        ports["CASCADEGW__HTTP__WEBHOOK_PROCESSES"] = "1"
        ports["CASCADEGW__HTTP__WEBHOOK_BIND"] = f'"{ports["CASCADEGW__HTTP__BIND"]}"'
        for command in ("check-config", "run"):
            line = one_line_exit_2(run([command], tmp_path, ports))
            assert "http.webhook_bind" in line
            assert "takes the same port as http.bind" in line
            assert "CASCADEGW__HTTP__WEBHOOK_BIND" in line

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("CASCADEGW__HTTP__PUBLIC_BIND", "localhost:{http}"),
            ("CASCADEGW__HTTP__PUBLIC_BIND", "0.0.0.0:{http}"),
            ("CASCADEGW__HTTP__PUBLIC_BIND", "127.0.0.1:{ingest}"),
        ],
    )
    def test_a_public_bind_on_another_listeners_port(
        self, key: str, value: str, tmp_path: Path
    ) -> None:
        ports = free_ports(tmp_path)
        http = ports["CASCADEGW__HTTP__BIND"].rsplit(":", 1)[1]
        ingest = ports["CASCADEGW__INGEST__BIND"].rsplit(":", 1)[1]
        ports[key] = value.format(http=http, ingest=ingest)
        line = one_line_exit_2(run(["check-config"], tmp_path, ports))
        assert "takes the same port as" in line
        assert key in line

    def test_a_webhook_process_that_cannot_bind_fails_the_start(self, tmp_path: Path) -> None:
        with socket.socket() as taken:  # another process's listener (no SO_REUSEPORT)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            ports = free_ports(tmp_path)
            ports["CASCADEGW__HTTP__WEBHOOK_PROCESSES"] = "2"
            ports["CASCADEGW__HTTP__WEBHOOK_BIND"] = f'"127.0.0.1:{port}"'
            done = run(["run"], tmp_path, ports)
            line = one_line_exit_2(done)
        assert "listening" not in done.stdout
        assert line.startswith(f"cascadegw: http.webhook_bind = '127.0.0.1:{port}': ")
        assert "address already in use" in line
        assert "another process holds it" in line
        assert "CASCADEGW__HTTP__WEBHOOK_BIND" in line

    def test_a_bad_config_value(self, tmp_path: Path) -> None:
        config = tmp_path / "bad.toml"
        config.write_bytes(default_config_bytes().replace(b"percent = 5.0", b"percent = 500.0"))
        line = one_line_exit_2(run(["--config", str(config), "check-config"], tmp_path))
        assert "policy.control_group.percent" in line

    def test_an_unreadable_config_file(self, tmp_path: Path) -> None:
        line = one_line_exit_2(run(["--config", str(tmp_path / "nope.toml"), "run"], tmp_path))
        assert "--config" in line

    def test_an_unwritable_journal_directory(self, tmp_path: Path) -> None:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("a file where the data directory should be")
        environ = {**free_ports(tmp_path), "CASCADEGW__STORE__DATA_DIR": str(blocker)}
        line = one_line_exit_2(run(["run"], tmp_path, environ))
        assert "cannot open it" in line
        assert "store.data_dir" in line

    def test_debug_shows_the_traceback(self, tmp_path: Path) -> None:
        config = tmp_path / "bad.toml"
        config.write_bytes(b"currency = 5")
        done = run(["--debug", "--config", str(config), "check-config"], tmp_path)
        assert 0 != done.returncode
        assert "Traceback" in done.stderr


class TestCtrlC:
    @pytest.mark.parametrize("command", [["simulate"], ["run"]])
    def test_stops_without_a_traceback(self, command: list[str], tmp_path: Path) -> None:
        ports = free_ports(tmp_path)
        process = subprocess.Popen(
            [CASCADEGW, *command],
            env=environment(tmp_path, **ports),
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            first = process.stdout.readline()  # it is up once it prints
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert first
        assert "Traceback" not in err
        assert process.returncode in (0, 130)
