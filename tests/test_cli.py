"""The ``cascadegw`` command line: a bad config is one line and exit code 2; a reader that
closes standard output early ends a command quietly; ``report --token``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from gateway.cli import main

CASCADEGW = str(Path(sys.executable).with_name("cascadegw"))

TENANT = b"""
[providers.sms_main]
kind = "twilio"
simulated = true

[tenants.acme]
brand = "Acme"
cascade = ["sms"]
providers = { sms = ["sms_main"] }

[[tenants.acme.experiments.x.variants]]
name = "a"
weight = %s
[[tenants.acme.experiments.x.variants]]
name = "b"
weight = %s
"""


class TestBadExperimentWeights:
    """A weight the core would refuse (inf) or whose total overflows (1e308 twice) is named by
    key before any command uses it: one line, exit 2, no traceback."""

    @pytest.mark.parametrize(("first", "second"), [(b"inf", b"1"), (b"1e308", b"1e308")])
    @pytest.mark.parametrize("command", ["check-config", "run"])
    def test_one_line_naming_the_key(
        self,
        first: bytes,
        second: bytes,
        command: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("HOME", str(tmp_path))
        config = tmp_path / "gateway.toml"
        config.write_bytes(TENANT % (first, second))
        assert 2 == main(["--config", str(config), command])
        out, err = capsys.readouterr()
        assert "" == out
        assert [
            "cascadegw: config: tenants.acme.experiments.x.variants[0].weight: "
            "Expected `float` <= 1000000.0 (--debug shows the traceback)"
        ] == err.splitlines()


class _Reports(BaseHTTPRequestHandler):
    """An admin API answering every report with a big JSON body; remembers the tokens."""

    tokens: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).tokens.append(self.headers.get("Authorization"))
        body = json.dumps({"variants": [{"name": f"v{i}", "sent": i} for i in range(5000)]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def admin_api() -> Iterator[str]:
    _Reports.tokens = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Reports)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_reader(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed command with standard output a pipe whose reader is already gone
    (what ``| head`` is once head has its lines)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [CASCADEGW, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "HOME": str(home)},
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


class TestClosedStandardOutput:
    """``cascadegw report experiment demo cascade_order | head`` ends quietly: exit 1 (what
    Python exits with on EPIPE) and nothing on standard error, for every command that prints."""

    @pytest.mark.parametrize(
        "command", [["schema"], ["check-config"], ["keys", "generate"], ["report"]]
    )
    def test_quiet(self, command: list[str], tmp_path: Path, admin_api: str) -> None:
        if command == ["report"]:
            command = ["report", "experiment", "demo", "cascade_order", "--url", admin_api]
        done = closed_reader(command, tmp_path)
        assert "" == done.stderr
        assert 1 == done.returncode

    def test_in_process(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A standard output without a file descriptor behind it is replaced too."""

        class Closed(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        monkeypatch.setattr(sys, "stdout", Closed())
        assert 1 == main(["schema"])
        print("after the reader went away: nowhere, and no error")
        assert "" == capsys.readouterr().err

    def test_debug_shows_the_traceback(self, tmp_path: Path) -> None:
        done = closed_reader(["--debug", "schema"], tmp_path)
        assert "BrokenPipeError" in done.stderr


class TestReportToken:
    """``--token`` sends a tenant's own admin token; without it, the configured
    ``http.admin_token``; ``-`` reads it from standard input (out of ps and shell history)."""

    def report(
        self, admin_api: str, tmp_path: Path, *options: str, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CASCADEGW, "report", "campaign", "demo", "winter", "--url", admin_api, *options],
            input=stdin,
            capture_output=True,
            env={
                "PATH": os.environ["PATH"],
                "HOME": str(tmp_path),
                "CASCADEGW__HTTP__ADMIN_TOKEN": "the-operators-token-0123",
            },
            text=True,
            timeout=60,
            check=False,
        )

    def test_the_token_given_or_configured(self, admin_api: str, tmp_path: Path) -> None:
        given = self.report(admin_api, tmp_path, "--token", "a-tenants-own-token-42")
        configured = self.report(admin_api, tmp_path)
        from_stdin = self.report(admin_api, tmp_path, "--token", "-", stdin="from-stdin-777\n")
        for done in (given, configured, from_stdin):
            assert 0 == done.returncode, done.stderr
            assert 5000 == len(json.loads(done.stdout)["variants"])
        assert [
            "Bearer a-tenants-own-token-42",
            "Bearer the-operators-token-0123",
            "Bearer from-stdin-777",
        ] == _Reports.tokens

    def test_no_token_on_standard_input(self, admin_api: str, tmp_path: Path) -> None:
        done = self.report(admin_api, tmp_path, "--token", "-")
        assert 2 == done.returncode
        assert "cascadegw: --token -: standard input gave no token" in done.stderr
        assert [] == _Reports.tokens

    def test_a_token_file_with_a_byte_order_mark(self, admin_api: str, tmp_path: Path) -> None:
        """Windows editors start a saved file with U+FEFF; it is not part of the token."""
        done = self.report(admin_api, tmp_path, "--token", "-", stdin="\ufefffrom-a-file-9\r\n")
        assert 0 == done.returncode, done.stderr
        assert ["Bearer from-a-file-9"] == _Reports.tokens

    @pytest.mark.parametrize(
        ("options", "stdin"),
        [
            (("--token", "t\u043eken-with-cyrillic-o"), ""),
            (("--token", "abc\r\nX-Evil: 1"), ""),
            (("--token", "two words"), ""),
            (("--token", ""), ""),
            (("--token", "-"), "\u00e9t\u00e9\n"),
        ],
        ids=["non-ASCII", "CR LF", "a space", "empty", "non-ASCII on stdin"],
    )
    def test_a_token_that_cannot_be_a_header_is_one_line(
        self, admin_api: str, tmp_path: Path, options: tuple[str, ...], stdin: str
    ) -> None:
        done = self.report(admin_api, tmp_path, *options, stdin=stdin)
        assert 2 == done.returncode
        (line,) = done.stderr.splitlines()
        assert line.startswith(
            f"cascadegw: {'--token -' if stdin else '--token'}: a token is visible ASCII "
            "characters without spaces"
        ), line
        assert [] == _Reports.tokens
