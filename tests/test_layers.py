"""The import-linter contracts in pyproject.toml hold, and each one breaks when its rule does.

A contract nothing can break checks nothing (a misspelt module name, say, matches no import). So
for each contract a copy of ``gateway/`` and ``adapters/`` gets one import that violates exactly
that contract, and ``lint-imports`` must call that contract BROKEN and keep every other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS: list[str] = [
    contract["name"]
    for contract in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
]
_VERDICT = re.compile(r"^(?P<name>.+) (?P<verdict>KEPT|BROKEN)$", re.MULTILINE)

CORE_PURE = "the core is pure: no I/O, no clocks, no runtime"
INDEPENDENT = "http and runtime are independent: they meet in gateway.inbound"
STORE_BELOW = "the store lies below the runtime"
ADAPTERS_LEAVES = "adapters are leaves: they import nothing that runs the gateway"
HTTPSERVER_LEAF = "the lean HTTP server is a leaf"
NO_CLOCK = "provider adapters read no clock"
MEMORY_FOR_TESTS = "the memory journal is for tests: nothing that runs the gateway imports it"
MEMORY_ALONE = "the memory journal stands alone: no SQLite, no runtime"


class Probe(NamedTuple):
    contract: str
    module: str
    """The module given the import: a new one, or an existing one it is appended to."""
    line: str


PROBES: list[Probe] = [
    Probe(CORE_PURE, "gateway.core._probe", "import trio"),
    Probe(CORE_PURE, "gateway.core._probe", "import time"),  # a clock read
    Probe(CORE_PURE, "gateway.core._probe", "from gateway.clock import wall_time"),
    Probe(INDEPENDENT, "gateway.http._probe", "import gateway.runtime.engine"),
    Probe(INDEPENDENT, "gateway.runtime._probe", "import gateway.http.admin"),
    Probe(STORE_BELOW, "gateway.store._probe", "import gateway.runtime.engine"),
    Probe(ADAPTERS_LEAVES, "adapters._probe", "import gateway.runtime.engine"),
    Probe(ADAPTERS_LEAVES, "adapters.simulators._probe", "import gateway.config"),
    # not a gateway module: the simulators import the server, so that would break theirs too
    Probe(HTTPSERVER_LEAF, "gateway.httpserver", "import starlette"),
    Probe(NO_CLOCK, "adapters.fcm", "from gateway.clock import wall_time"),
    Probe(NO_CLOCK, "adapters.fcm", "import time"),
    Probe(MEMORY_FOR_TESTS, "gateway.runtime._probe", "import gateway.store.memory"),
    Probe(MEMORY_ALONE, "gateway.store.memory", "import sqlite3"),
]


def lint_imports(root: Path) -> tuple[int, str, dict[str, str]]:
    """Run lint-imports on the tree at ``root``: exit status, output, contract -> verdict."""
    completed = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=root,
        # the copy, not the editable install, is what `gateway` and `adapters` must resolve to
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    verdicts = {m["name"]: m["verdict"] for m in _VERDICT.finditer(completed.stdout)}
    return completed.returncode, output, verdicts


def test_the_tree_keeps_every_contract() -> None:
    status, output, verdicts = lint_imports(ROOT)

    assert (0, dict.fromkeys(CONTRACTS, "KEPT")) == (status, verdicts), output


def test_every_contract_has_a_probe() -> None:
    assert set(CONTRACTS) == {probe.contract for probe in PROBES}


@pytest.mark.parametrize("probe", PROBES, ids=[f"{p.module}: {p.line}" for p in PROBES])
def test_a_violation_breaks_its_contract(probe: Probe, tmp_path: Path) -> None:
    for package in ("gateway", "adapters"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path.joinpath(*probe.module.split(".")).with_suffix(".py")
    existing = path.read_text() if path.exists() else ""
    path.write_text(f"{existing}{probe.line}  # probe: breaks {probe.contract!r}\n")

    status, output, verdicts = lint_imports(tmp_path)

    expected = {name: "BROKEN" if name == probe.contract else "KEPT" for name in CONTRACTS}
    assert (1, expected) == (status, verdicts), output
    # the report names the importing module: the copy was analysed, not the installed tree
    assert f"{probe.module} -> " in output, output
