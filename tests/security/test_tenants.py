"""Nobody acts for a tenant without its key: CURVE on ZeroMQ, tokens on the admin API.

Real sockets and a real HTTP server; keys are generated per test. Tenant ``acme`` lists the
key of its CRM, tenant ``beta`` the key of its own; a third key belongs to nobody.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zmq
import zmq.utils.monitor

from gateway.app import Gateway, open_gateway
from gateway.client import open_client, open_subscription
from gateway.config import GatewayConfig, default_config_bytes, is_loopback, load_config
from gateway.core.errors import ConfigError
from gateway.embedded import start_edge
from gateway.runtime import zmqio
from gateway.runtime.workers import ProcessRestarts
from tests.support import NOON_UTC, in_test_providers, make_config, promo


class Keys:
    def __init__(self) -> None:
        public, secret = zmq.curve_keypair()
        self.public, self.secret = public.decode(), secret.decode()


SERVER, ACME, BETA, STRANGER = Keys(), Keys(), Keys(), Keys()
ACME_TOKEN, BETA_TOKEN, OPERATOR_TOKEN = (
    "acme-admin-token",
    "beta-admin-token",
    "operator-admin-token",
)


SECRETS = {
    "CASCADEGW__INGEST__CURVE_SECRET_KEY": SERVER.secret,
    "CASCADEGW__TENANTS__ACME__ADMIN_TOKEN": ACME_TOKEN,
    "CASCADEGW__TENANTS__BETA__ADMIN_TOKEN": BETA_TOKEN,
    "CASCADEGW__HTTP__ADMIN_TOKEN": OPERATOR_TOKEN,
}


def curve_config(tmp_path: Path) -> GatewayConfig:
    beta_providers = ", ".join(f'{c} = ["{c}1"]' for c in ("push", "email", "viber", "sms"))
    return make_config(
        tmp_path,
        tenant_extra=f'client_keys = ["{ACME.public}"]\n'
        f'[tenants.beta]\nbrand = "Beta"\nclient_keys = ["{BETA.public}"]\n'
        f"providers = {{ {beta_providers} }}\n",
        environ=SECRETS,
        write_to=tmp_path / "gateway.toml",
    )


@asynccontextmanager
async def running_edge(config: GatewayConfig, tmp_path: Path) -> AsyncIterator[Gateway]:
    """The gateway as ``cascadegw run`` serves it: behind the ZeroMQ edge process, which
    does CURVE and reads the same config file and secrets."""
    async with trio.open_nursery() as nursery:
        _, _, link = await start_edge(
            nursery,
            config,
            config_path=str(tmp_path / "gateway.toml"),
            environ={**os.environ, **SECRETS},
            restarts=ProcessRestarts(),
        )
        async with open_gateway(
            config, adapters=in_test_providers(config), wall_at_start=NOON_UTC, edge=link
        ) as gateway:
            yield gateway
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["in_process", "edge"])
def ingest_mode(request: pytest.FixtureRequest) -> str:
    """Each ZeroMQ test runs against both places the sockets can live."""
    return str(request.param)


@asynccontextmanager
async def running(tmp_path: Path, mode: str = "in_process") -> AsyncIterator[Gateway]:
    config = curve_config(tmp_path)
    if mode == "edge":
        async with running_edge(config, tmp_path) as gateway:
            yield gateway
        return
    async with open_gateway(
        config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
    ) as gateway:
        yield gateway


def client_for(gateway: Gateway, keys: Keys) -> Any:
    return open_client(
        gateway.ingest_endpoint,
        timeout_seconds=30,
        server_key=SERVER.public,
        public_key=keys.public,
        secret_key=keys.secret,
    )


async def handshake_outcome(endpoint: str, keys: Keys | None) -> int:
    """Connect a DEALER (plain, or CURVE with ``keys``) and return the first handshake event:
    ``EVENT_HANDSHAKE_SUCCEEDED`` or one of the ``EVENT_HANDSHAKE_FAILED_*``."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey = SERVER.public.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_secretkey = keys.secret.encode()
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    wanted = {
        zmq.EVENT_HANDSHAKE_SUCCEEDED,
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_DISCONNECTED,
    }
    try:
        with trio.fail_after(30):
            while True:
                event = zmq.utils.monitor.parse_monitor_message(await zmqio.recv_multipart(monitor))
                if event["event"] in wanted:
                    return int(event["event"])
    finally:
        trio.lowlevel.notify_closing(int(monitor.getsockopt(zmq.FD)))
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


class TestZeroMQ:
    async def test_a_client_without_a_key_cannot_connect(
        self, tmp_path: Path, ingest_mode: str
    ) -> None:
        async with running(tmp_path, ingest_mode) as gateway:
            plain = await handshake_outcome(gateway.ingest_endpoint, None)
            stranger = await handshake_outcome(gateway.ingest_endpoint, STRANGER)
            known = await handshake_outcome(gateway.ingest_endpoint, ACME)
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED != plain
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH == stranger
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED == known

    async def test_a_key_acts_only_for_its_own_tenant(
        self, tmp_path: Path, ingest_mode: str
    ) -> None:
        async with running(tmp_path, ingest_mode) as gateway, client_for(gateway, ACME) as acme:
            own = await acme.send(promo("m1"))
            foreign = await acme.send(promo("m2", tenant="beta"))
            consent = await acme.consent(
                "beta", "r1", kind="advertising", action="withdraw", source="attacker"
            )
            status = await acme.status("m1", "beta")
            batch = await acme.send_batch([promo("m3"), promo("m4", tenant="beta")])
        assert "accepted" == own["status"]
        for refused in (foreign, consent, status, batch[1]):
            assert ("rejected", "unauthorized") == (refused["status"], refused["reason"])
        assert "accepted" == batch[0]["status"]
        assert "m2" == foreign["id"]

    async def test_a_subscriber_sees_only_its_tenants_events(
        self, tmp_path: Path, ingest_mode: str
    ) -> None:
        async with (
            running(tmp_path, ingest_mode) as gateway,
            client_for(gateway, ACME) as acme,
            client_for(gateway, BETA) as beta,
            open_subscription(
                gateway.status_endpoint,
                "",
                server_key=SERVER.public,
                public_key=ACME.public,
                secret_key=ACME.secret,
            ) as everything,
            open_subscription(
                gateway.status_endpoint,
                "beta",
                server_key=SERVER.public,
                public_key=ACME.public,
                secret_key=ACME.secret,
            ) as foreign,
        ):
            await wait_for_subscriptions(gateway, accepted=1, refused=1)
            # beta's events are published first; acme's after them on the same socket,
            # so once acme's arrive, any beta event sent to this subscriber would have too
            await beta.send(promo("b1", tenant="beta"))
            await acme.send(promo("a1"))
            seen: list[dict[str, Any]] = []
            with trio.fail_after(60):
                while not any(e["id"] == "a1" for e in seen):
                    seen.append(await everything.receive())
            leaked = [e for e in drain(everything) + drain(foreign) if e["tenant"] != "acme"]
        assert {"acme"} == {event["tenant"] for event in seen}
        assert [] == leaked


def drain(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    found = []
    while True:
        try:
            found.append(channel.receive_nowait())
        except trio.WouldBlock:
            return found


async def wait_for_subscriptions(gateway: Gateway, *, accepted: int, refused: int) -> None:
    """Wait until the publisher has read both subscriptions (they travel asynchronously)."""
    registry = gateway.registry
    with trio.fail_after(60):
        while True:
            seen = [
                registry.get_sample_value(
                    "gateway_status_subscriptions_total", {"verdict": verdict}
                )
                or 0.0
                for verdict in ("accepted", "refused")
            ]
            if seen[0] >= accepted and seen[1] >= refused:
                return
            await trio.sleep(0.01)


class TestAdminTokens:
    @pytest.mark.parametrize(
        ("token", "tenant", "expected"),
        [
            (ACME_TOKEN, "acme", 404),  # allowed: the message just does not exist
            (ACME_TOKEN, "beta", 403),
            (BETA_TOKEN, "acme", 403),
            (OPERATOR_TOKEN, "beta", 404),
            ("guess", "acme", 401),
            (None, "acme", 401),
        ],
        ids=["own", "other-tenant", "other-way", "operator", "wrong", "none"],
    )
    async def test_a_token_reads_only_its_tenant(
        self,
        token: str | None,
        tenant: str,
        expected: int,
        tmp_path: Path,
    ) -> None:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with (
            running(tmp_path) as gateway,
            httpx.AsyncClient(base_url=gateway.http_url, headers=headers) as http,
        ):
            read = await http.get(f"/v1/messages/{tenant}/nope")
            write = await http.put(
                f"/v1/recipients/{tenant}/r1/consents",
                json={"kind": "advertising", "action": "withdraw", "source": "crm"},
            )
        assert expected == read.status_code
        assert (200 if expected == 404 else expected) == write.status_code


class TestExposure:
    """A surface beyond loopback without keys or tokens refuses to start, in one line."""

    @pytest.mark.parametrize(
        ("variable", "value", "named"),
        [
            (
                "CASCADEGW__INGEST__BIND",
                "tcp://0.0.0.0:5555",
                "CASCADEGW__INGEST__CURVE_SECRET_KEY",
            ),
            (
                "CASCADEGW__INGEST__STATUS_BIND",
                "tcp://10.1.2.3:5556",
                "CASCADEGW__INGEST__CURVE_SECRET_KEY",
            ),
            ("CASCADEGW__HTTP__BIND", "0.0.0.0:8080", "CASCADEGW__HTTP__ADMIN_TOKEN"),
        ],
        ids=["ingest", "status", "admin"],
    )
    def test_refuses_to_start(self, variable: str, value: str, named: str, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_bytes(default_config_bytes())
        for command in ("check-config", "run"):
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "--config", str(config), command],
                env={"PATH": "/usr/bin:/bin", variable: value, "HOME": str(tmp_path)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert 2 == done.returncode, done.stderr
            lines = done.stderr.strip().splitlines()
            assert 1 == len(lines), done.stderr
            assert named in lines[0]
            assert "Traceback" not in done.stderr


class TestTokenAndBindRules:
    @pytest.mark.parametrize(
        ("address", "loopback"),
        [
            ("tcp://127.0.0.1:5555", True),
            ("tcp://127.8.9.10:5555", True),
            ("tcp://localhost:5555", True),
            ("tcp://[::1]:5555", True),
            ("ipc:///run/cascadegw.sock", True),
            ("tcp://127.0.0.1.nip.io:5555", False),
            ("tcp://0.0.0.0:5555", False),
            ("tcp://*:5555", False),
            ("10.0.0.5:8080", False),
        ],
    )
    def test_what_counts_as_loopback(self, address: str, loopback: bool) -> None:
        assert loopback == is_loopback(address)

    @pytest.mark.parametrize("token", ["", "short-token"])
    def test_a_short_admin_token_is_refused(self, token: str) -> None:
        with pytest.raises(ConfigError, match=r"http\.admin_token: at least 16 characters"):
            load_config(b'[http]\nbind = "0.0.0.0:8080"', {"CASCADEGW__HTTP__ADMIN_TOKEN": token})

    async def test_the_bearer_scheme_is_case_insensitive(self, tmp_path: Path) -> None:
        async with running(tmp_path) as gateway, httpx.AsyncClient() as http:
            url = f"{gateway.http_url}/v1/messages/acme/nope"
            lower = await http.get(url, headers={"Authorization": f"bearer {ACME_TOKEN}"})
            other = await http.get(url, headers={"Authorization": f"Basic {ACME_TOKEN}"})
        assert 404 == lower.status_code
        assert 401 == other.status_code

    async def test_the_admin_api_keeps_the_protocol_limits(self, tmp_path: Path) -> None:
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        update = {"kind": "advertising", "action": "withdraw", "source": "crm"}
        async with (
            running(tmp_path) as gateway,
            httpx.AsyncClient(base_url=gateway.http_url, headers=headers) as http,
        ):
            long_id = await http.put(f"/v1/recipients/acme/{'x' * 200}/consents", json=update)
            many = await http.put("/v1/recipients/acme/r1/consents", json=[update] * 1001)
            future = await http.put(
                "/v1/recipients/acme/r1/consents", json={**update, "at": "2099-01-01T00:00:00Z"}
            )
            fine = await http.put("/v1/recipients/acme/r1/consents", json=[update] * 2)
        assert [400, 400, 400, 200] == [r.status_code for r in (long_id, many, future, fine)]
        assert "recipient_id" in long_id.json()["detail"]
        assert "in the future" in future.json()["detail"]
