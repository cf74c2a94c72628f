"""The ``cascadegw`` command line, in-process: a bad config is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

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
