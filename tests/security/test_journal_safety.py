"""The journal is never silently replaced, a bad row is named, a full disk costs no ack.

Against ``cascadegw`` as an operator runs it: the command line and a real process.
"""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from gateway.client import Client, ClientError, send_request
from tests.e2e.processes import GatewayProcess, standalone_config

# real processes, crashes, minutes of load: `make test` runs them, `make unit` does not
pytestmark = pytest.mark.slow


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert 1 == len(lines), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def service(message_id: str, *, size: int = 100) -> dict[str, Any]:
    return send_request(
        message_id,
        "acme",
        recipient={"id": f"r-{message_id}", "email": "ignore@example.com"},
        category="service",
        content={"email": {"subject": "Your order", "text": "x" * size}},
    )


class TestMissingJournal:
    def test_refuses_to_start_until_init(self, tmp_path: Path) -> None:
        config, _, _, _ = standalone_config(tmp_path)
        refused = cli(config, "run")
        created = cli(config, "init")
        again = cli(config, "init")
        assert 2 == refused.returncode
        assert "does not exist" in one_line(refused)
        assert "cascadegw init" in one_line(refused)
        assert 0 == created.returncode, created.stderr
        assert (tmp_path / "var" / "journal.db").exists()
        assert (tmp_path / "var" / "tracking.key").stat().st_mode & 0o777 == 0o600
        assert 0 == again.returncode
        assert "exists already" in again.stdout

    async def test_a_deleted_journal_is_not_replaced_by_an_empty_one(self, tmp_path: Path) -> None:
        config, http_url, ingest, _ = standalone_config(tmp_path)
        assert 0 == cli(config, "init").returncode
        process = GatewayProcess(config, {}, http_url)
        await process.start()
        with Client(ingest, timeout_seconds=30) as client:
            assert (
                "ok"
                == client.consent(
                    "acme", "r1", kind="advertising", action="withdraw", source="crm"
                )["status"]
            )
        await process.stop()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / "var" / f"journal.db{suffix}").unlink(missing_ok=True)
        refused = cli(config, "run")
        # even a config that creates journals on first start will not replace a lost one
        config.write_text(config.read_text().replace("[store]\n", "[store]\ncreate = true\n"))
        still = cli(config, "run")
        for done in (refused, still):
            assert 2 == done.returncode
            assert "is missing, but journal.db.id beside it says there was one" in one_line(done)
            assert "restore it from a backup" in one_line(done)


class TestCorruptRow:
    async def test_start_names_it_and_quarantine_lets_it_start(self, tmp_path: Path) -> None:
        config, http_url, ingest, _ = standalone_config(tmp_path)
        assert 0 == cli(config, "init").returncode
        process = GatewayProcess(config, {}, http_url)
        await process.start()
        with Client(ingest, timeout_seconds=30) as client:
            # deferred a day: it stays active, so recovery decodes its row
            for name in ("m1", "m2"):
                request = service(name)
                request["send_at"] = datetime_in_a_day()
                assert "accepted" == client.send(request)["status"]
        await process.stop()
        journal = tmp_path / "var" / "journal.db"
        with sqlite3.connect(journal) as db:
            db.execute("UPDATE messages SET record = x'c1c1c1' WHERE key = 'acme:m1'")
        refused = cli(config, "run")
        checked = cli(config, "journal", "check")
        quarantined = cli(config, "journal", "check", "--quarantine")
        clean = cli(config, "journal", "check")
        await process.start()
        with Client(ingest, timeout_seconds=30) as client:
            kept = client.status("m2", "acme")
        await process.stop()
        assert 2 == refused.returncode
        assert "messages[acme:m1]" in one_line(refused)
        assert "journal check --quarantine" in one_line(refused)
        assert 1 == checked.returncode
        assert "messages[acme:m1]" in checked.stdout
        assert 0 == quarantined.returncode
        assert 0 == clean.returncode
        assert "ok" == kept["status"]
        with sqlite3.connect(journal) as db:
            rows = db.execute("SELECT source, row FROM quarantine").fetchall()
        assert ("messages", "acme:m1") in rows


def datetime_in_a_day() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


LIMIT_BYTES = 3 * 1024 * 1024


def limit_file_size() -> None:
    """In the child: files may not grow past LIMIT_BYTES (a full disk, as the process sees it);
    the hard limit stays open so the test can lift the soft one from outside."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.RLIM_INFINITY))


class TestDiskFull:
    async def test_no_false_ack_overloaded_meanwhile_and_recovery(self, tmp_path: Path) -> None:
        config, http_url, ingest, _ = standalone_config(tmp_path)
        assert 0 == cli(config, "init").returncode
        process = GatewayProcess(config, {}, http_url, preexec=limit_file_size)
        await process.start()
        assert process.process is not None
        pid = process.process.pid
        acked: set[str] = set()
        unanswered: list[str] = []
        with Client(ingest, timeout_seconds=5) as writer:
            for index in range(1000):
                batch = [service(f"m{index}-{n}", size=2000) for n in range(20)]
                try:
                    results = writer.send_batch(batch)
                except ClientError:
                    unanswered = [request["id"] for request in batch]
                    break
                acked |= {r["id"] for r in results if r["status"] == "accepted"}
            assert unanswered, "the limit was never reached"
            # another CRM meanwhile: refused at once, with the reason
            with Client(ingest, timeout_seconds=5) as other:
                during = other.send(service("during"))
            # space returns: the process recovers by itself, and the waiting answer arrives
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            late = await trio.to_thread.run_sync(wait_reply, writer)
            with Client(ingest, timeout_seconds=30) as other:
                after = other.send(service("after"))
        assert process.process.returncode is None  # it stayed up throughout
        await process.stop()
        await process.start()  # and every answered message is in the journal
        with Client(ingest, timeout_seconds=30) as client:
            missing = [key for key in sorted(acked) if client.status(key, "acme")["status"] != "ok"]
        await process.stop()
        assert ("rejected", "overloaded") == (during["status"], during["reason"])
        assert "journal cannot commit" in during["detail"]
        assert {r["status"] for r in late} == {"accepted"}
        assert {r["id"] for r in late} == set(unanswered)
        assert "accepted" == after["status"]
        assert [] == missing
        assert len(acked) > 20


def wait_reply(client: Client) -> list[dict[str, Any]]:
    """The reply that was outstanding when the disk filled (the client timed out on it)."""
    for _ in range(60):
        if client.sock.poll(1000):
            reply: list[dict[str, Any]] = msgpack.unpackb(client.sock.recv_multipart()[1])
            return reply
    raise AssertionError("the outstanding reply never came")


class TestNeverSilentlyReplaced:
    """What an operator can do to the data directory by mistake, and what start says."""

    def started(self, tmp_path: Path) -> Path:
        config, _, _, _ = standalone_config(tmp_path)
        assert 0 == cli(config, "init").returncode
        return config

    def test_a_truncated_journal_is_refused(self, tmp_path: Path) -> None:
        config = self.started(tmp_path)
        (tmp_path / "var" / "journal.db").write_bytes(b"")
        line = one_line(cli(config, "run"))
        assert "is not the one this directory had" in line

    def test_a_file_that_is_not_a_database_is_named(self, tmp_path: Path) -> None:
        config = self.started(tmp_path)
        (tmp_path / "var" / "journal.db").write_bytes(b"not a database at all" * 1000)
        refused, checked = cli(config, "run"), cli(config, "journal", "check")
        assert "is not a readable SQLite database" in one_line(refused)
        assert 2 == checked.returncode
        assert "is not a readable SQLite database" in one_line(checked)

    def test_a_lost_tracking_key_is_refused_until_init_makes_a_new_one(
        self, tmp_path: Path
    ) -> None:
        config = self.started(tmp_path)
        (tmp_path / "var" / "tracking.key").unlink()
        line = one_line(cli(config, "run"))
        renewed = cli(config, "init")
        assert "tracking.key is missing beside an existing journal" in line
        assert 0 == renewed.returncode
        assert "a new tracking key" in renewed.stdout
        assert (tmp_path / "var" / "tracking.key").exists()

    async def test_a_quarantined_consent_withdraws_on_the_safe_side(self, tmp_path: Path) -> None:
        config, http_url, ingest, _ = standalone_config(tmp_path)
        assert 0 == cli(config, "init").returncode
        process = GatewayProcess(config, {}, http_url)
        await process.start()
        with Client(ingest, timeout_seconds=30) as client:
            assert (
                "ok"
                == client.consent(
                    "acme", "d1", kind="advertising", action="withdraw", source="one_click"
                )["status"]
            )
        await process.stop()
        with sqlite3.connect(tmp_path / "var" / "journal.db") as db:
            db.execute("UPDATE consents SET body = 'damaged' WHERE recipient = 'acme:d1'")
        refused = cli(config, "run")
        moved = cli(config, "journal", "check", "--quarantine")
        await process.start()
        with Client(ingest, timeout_seconds=30) as client:
            promo = send_request(
                "after",
                "acme",
                recipient={"id": "d1", "email": "d1@example.com"},
                category="promo",
                content={"email": {"subject": "Sale", "text": "Sale"}},
            )
            answer = client.send(promo)
        await process.stop()
        assert "consents[1]" in one_line(refused)
        assert 0 == moved.returncode
        assert "recipient acme:d1" in moved.stdout
        assert ("rejected", "no_consent") == (answer["status"], answer["reason"])
