"""The deployment files work as written: the Dockerfile lints clean and its install and start
commands work in a fresh virtualenv; the compose file is valid Compose and its gateway config is
valid cascadegw config; the systemd unit verifies and its commands start and stop a gateway.

Where this machine can build and run containers, ``make image`` does it for real; these tests
stand in where it cannot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.config import default_config_bytes, load_config
from tests.e2e.test_operator_errors import free_ports, wait_ready

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
UNIT = ROOT / "deploy" / "systemd" / "cascadegw.service"
COMPOSE_SCHEMA = ROOT / ".venv" / "compose_spec.json"  # `make` extracts it (Makefile)
COMPOSE_ENV = {
    "CASCADEGW_CURVE_SECRET_KEY": "x" * 40,
    "CASCADEGW_CLIENT_PUBLIC_KEY": "y" * 40,
    "CASCADEGW_ADMIN_TOKEN": "z" * 32,
}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def healthcheck_command(arguments: str) -> list[str]:
    """HEALTHCHECK [OPTIONS] CMD ["exec", "form"] → the command."""
    _options, _, command = arguments.partition(" CMD ")
    parsed = json.loads(command)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


class TestDockerfile:
    def test_hadolint_finds_nothing(self) -> None:
        done = subprocess.run(
            [str(BIN / "hadolint"), str(DOCKERFILE)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert 0 == done.returncode, done.stdout + done.stderr
        assert "" == done.stdout.strip()

    def test_what_the_issue_asks_of_the_image(self) -> None:
        build, final = stages(DOCKERFILE.read_text())
        assert build[0][1].endswith("AS build")
        keywords = dict(final)
        assert "COPY" in keywords
        assert "--from=build" in keywords["COPY"]
        assert re.fullmatch(r"\d+:\d+", keywords["USER"])
        assert not keywords["USER"].startswith("0")
        assert "/var/lib/cascadegw" in keywords["VOLUME"]
        assert ["cascadegw", "healthcheck"] == healthcheck_command(keywords["HEALTHCHECK"])
        assert "SIGTERM" == keywords["STOPSIGNAL"]
        # the build context is an allow-list: everything else (journals, keys, .env files,
        # virtualenvs) stays out of the image
        rules = [
            line.strip()
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert "*" == rules[0]
        copied = {
            name for keyword, rest in build if keyword == "COPY" for name in rest.split()[:-1]
        }
        assert copied == {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}

    def test_install_and_start_commands_work_in_a_fresh_virtualenv(self, tmp_path: Path) -> None:
        """The build stage's COPY and RUN, then the final stage's ENV, ENTRYPOINT, CMD,
        HEALTHCHECK and STOPSIGNAL, outside a container: /opt/cascadegw becomes a temporary
        directory, and the listeners move to free ports."""
        build, final = stages(DOCKERFILE.read_text())
        source = tmp_path / "src"
        source.mkdir()
        for keyword, rest in build:
            if keyword == "COPY":
                *names, _destination = rest.split()
                for name in names:
                    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
                    copy(ROOT / name, source / name)
        venv = tmp_path / "opt" / "cascadegw"
        (run_line,) = [rest for keyword, rest in build if keyword == "RUN"]
        command = re.sub(r"^--mount=\S+\s+", "", run_line).replace("/opt/cascadegw", str(venv))
        installed = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert 0 == installed.returncode, installed.stderr[-3000:]

        data = tmp_path / "var" / "lib" / "cascadegw"
        data.mkdir(parents=True)
        environ = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path)}
        for keyword, rest in final:
            if keyword == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    value = value.replace("$PATH", environ["PATH"])
                    environ[key] = value.replace("/var/lib/cascadegw", str(data))
        assert environ["CASCADEGW__STORE__DATA_DIR"] == str(data)
        environ.update(free_ports(tmp_path))
        keywords = dict(final)
        entrypoint = json.loads(keywords["ENTRYPOINT"])
        cmd = json.loads(keywords["CMD"])
        healthcheck = healthcheck_command(keywords["HEALTHCHECK"])

        process = subprocess.Popen(
            [*entrypoint, *cmd],
            env=environ,
            cwd=data,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = wait_ready(environ["CASCADEGW__HTTP__PUBLIC_URL"], process)
            health = subprocess.run(
                healthcheck, env=environ, capture_output=True, text=True, check=False
            )
            process.send_signal(getattr(signal, keywords["STOPSIGNAL"]))
            _, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert ready, err
        assert 0 == health.returncode, health.stderr
        assert 0 == process.returncode, err
        assert "Traceback" not in err
        assert (data / "cascadegw.db").exists()
        assert (data / "tracking.key").exists()

    def test_healthcheck_fails_when_nothing_answers(self, tmp_path: Path) -> None:
        environ = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **free_ports(tmp_path)}
        done = subprocess.run(
            [str(BIN / "cascadegw"), "healthcheck", "--timeout-seconds", "1"],
            env=environ,
            capture_output=True,
            text=True,
            check=False,
        )
        assert 1 == done.returncode
        assert "healthz" in done.stderr
        assert "Traceback" not in done.stderr


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}; a missing required one fails."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in environ and (environ[name] or operator in ("", "?", "-")):
            return environ[name]
        if operator.endswith("?"):
            raise LookupError(f"{name}: {argument}")
        return argument

    return re.sub(r"\$\{(\w+)(?:(:?[?-])([^}]*))?\}", value, text)


class TestCompose:
    def document(self) -> dict[str, object]:
        loaded = yaml.safe_load(interpolate(COMPOSE.read_text(), COMPOSE_ENV))
        assert isinstance(loaded, dict)
        return loaded

    def test_valid_against_the_compose_specification(self) -> None:
        assert COMPOSE_SCHEMA.exists(), "run `make test` (it extracts the Compose schema)"
        schema = json.loads(COMPOSE_SCHEMA.read_text())
        document = self.document()
        # the x- extension at the top is an anchor; the services merge it in (<<: *cascadegw)
        jsonschema.Draft7Validator(schema).validate(document)

    def test_a_missing_key_is_named(self) -> None:
        with pytest.raises(LookupError, match=r"keys\.sh"):
            interpolate(COMPOSE.read_text(), {})

    def test_services_and_their_files(self) -> None:
        services = self.document()["services"]
        assert isinstance(services, dict)
        assert {"gateway", "simulators", "prometheus", "grafana"} <= services.keys()
        for service in services.values():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):  # a bind mount, relative to deploy/
                    assert (COMPOSE.parent / source).exists(), source
        prometheus = " ".join(services["prometheus"]["volumes"])
        assert "config/prometheus/cascadegw.rules.yml" in prometheus
        grafana = " ".join(services["grafana"]["volumes"])
        assert "config/grafana/cascadegw.dashboard.json" in grafana
        gateway = services["gateway"]
        assert "user" not in gateway  # the image's own non-root user
        assert gateway["read_only"] is True
        assert gateway["cap_drop"] == ["ALL"]
        scrape = (COMPOSE.parent / "compose" / "prometheus.yml").read_text()
        assert "gateway:8080" in scrape
        assert "cascadegw.rules.yml" in scrape

    def test_its_gateway_config_is_valid(self, tmp_path: Path) -> None:
        environ = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "CASCADEGW_CONFIG": str(COMPOSE.parent / "compose" / "gateway.toml"),
            "CASCADEGW__STORE__DATA_DIR": str(tmp_path),
            "CASCADEGW__INGEST__CURVE_SECRET_KEY": keypair()[1],
            "CASCADEGW__TENANTS__DEMO__CLIENT_KEYS": json.dumps([keypair()[0]]),
            "CASCADEGW__HTTP__ADMIN_TOKEN": "t" * 32,
        }
        done = subprocess.run(
            [str(BIN / "cascadegw"), "check-config"],
            env=environ,
            capture_output=True,
            text=True,
            check=False,
        )
        assert 0 == done.returncode, done.stderr

    def test_its_simulators_start_without_the_gateways_secrets(self, tmp_path: Path) -> None:
        """The simulators service runs the compose command as written (its paths moved into a
        temporary directory): it needs none of the gateway's keys, and writes the
        providers' addresses and credentials for the gateway to source."""
        services = self.document()["services"]
        assert isinstance(services, dict)
        command = [str(part) for part in services["simulators"]["command"]]
        env_out = tmp_path / "providers.env"
        config = str(COMPOSE.parent / "compose" / "gateway.toml")
        command = [
            part.replace("/etc/cascadegw/gateway.toml", config)
            .replace("/var/lib/cascadegw-simulators/providers.env", str(env_out))
            .replace("--port=9001", "--port=0")
            .replace("--host=0.0.0.0", "--host=127.0.0.1")
            for part in command
        ]
        environ = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        process = subprocess.Popen(
            [str(BIN / "cascadegw"), *command],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not env_out.exists() and process.poll() is None:
                assert time.monotonic() < deadline, "no providers.env within 60 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert "Traceback" not in err
        # what the gateway's entrypoint sources, as its config sees it
        sourced = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in env_out.read_text().splitlines()
        )
        secrets = {
            "CASCADEGW__INGEST__CURVE_SECRET_KEY": keypair()[1],
            "CASCADEGW__HTTP__ADMIN_TOKEN": "t" * 32,
        }
        loaded = load_config(
            Path(config).read_bytes(), {**sourced, **secrets, "HOME": str(tmp_path)}
        )
        for provider in loaded.providers.values():
            assert provider.url.startswith("http://simulators:")

    @pytest.mark.skipif(
        shutil.which("docker-compose") is None,
        reason="docker-compose (Debian) not installed; the Compose schema check stands in",
    )
    def test_docker_compose_config_accepts_it(self) -> None:
        done = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"],
            env={**os.environ, **COMPOSE_ENV},
            capture_output=True,
            text=True,
            check=False,
        )
        assert 0 == done.returncode, done.stderr


def keypair() -> tuple[str, str]:
    import zmq

    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def systemd_command(line: str, venv_bin: Path) -> list[str]:
    """A systemd command line as the shell would get it: $$ is a literal $."""
    return shlex.split(line.replace("$$", "$").replace("/opt/cascadegw/bin", str(venv_bin)))


class TestSystemdUnit:
    def test_hardening(self) -> None:
        assert ["cascadegw"] == unit_values("User")
        assert ["cascadegw"] == unit_values("StateDirectory")
        assert ["on-failure"] == unit_values("Restart")
        assert ["2"] == unit_values("RestartPreventExitStatus")
        assert ["yes"] == unit_values("NoNewPrivileges")
        assert ["strict"] == unit_values("ProtectSystem")
        assert [""] == unit_values("CapabilityBoundingSet")
        assert ["SIGTERM"] == unit_values("KillSignal")
        # the journal is made once by hand: a unit that made one would replace a lost journal
        assert [] == unit_values("ExecStartPre")

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
    def test_systemd_analyze_verifies_it(self, tmp_path: Path) -> None:
        unit = tmp_path / UNIT.name
        unit.write_text(UNIT.read_text().replace("/opt/cascadegw/bin", str(BIN)))
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert 0 == done.returncode, done.stderr
        assert "" == done.stderr.strip()

    def test_as_installed_it_starts_restarts_and_refuses_a_lost_journal(
        self, tmp_path: Path
    ) -> None:
        """The README's install steps (init by hand, with the unit's environment), then the
        unit's ExecStart twice on one state directory; then the journal is lost and the next
        start refuses, one line, exit 2, which RestartPreventExitStatus keeps down."""
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        environ = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STATE_DIRECTORY": str(state)}
        for line in unit_values("Environment"):
            key, _, value = line.partition("=")
            environ[key] = value
        config = tmp_path / "gateway.toml"
        production = default_config_bytes().replace(b"create = true", b"create = false")
        assert b"create = false" in production
        config.write_bytes(production)
        environ["CASCADEGW_CONFIG"] = str(config)
        environ.update(free_ports(tmp_path))
        cascadegw = str(BIN / "cascadegw")
        made = subprocess.run(
            [cascadegw, "init"], env=environ, capture_output=True, text=True, check=False
        )
        assert 0 == made.returncode, made.stderr
        (start,) = unit_values("ExecStart")
        keys = []
        for _ in ("first", "second"):
            process = subprocess.Popen(
                systemd_command(start, BIN),
                env=environ,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                ready = wait_ready(environ["CASCADEGW__HTTP__PUBLIC_URL"], process)
                process.send_signal(signal.SIGTERM)
                _, err = process.communicate(timeout=60)
            finally:
                process.kill()
            assert ready, err
            assert 0 == process.returncode, err
            keys.append((state / "tracking.key").read_bytes())
        assert keys[0] == keys[1]

        for lost in state.glob("cascadegw.db*"):
            lost.unlink()
        refused = subprocess.run(
            systemd_command(start, BIN), env=environ, capture_output=True, text=True, timeout=60
        )
        assert 2 == refused.returncode
        assert ["2"] == unit_values("RestartPreventExitStatus")
        (line,) = refused.stderr.strip().splitlines()
        assert "does not exist" in line
        assert "cascadegw init" in line
