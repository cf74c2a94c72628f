"""Tracking links: signed, expiring, verifiable across a secret rotation and a restart."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import open_gateway
from gateway.client import open_client
from gateway.config import load_config, tracking_secrets
from gateway.core.errors import ConfigError
from gateway.core.model import Channel
from gateway.runtime.keyfile import KEY_FILE, link_secrets, load_or_create
from gateway.tracking import LinkKind, LinkPayload, LinkRejection, LinkSigner
from tests.support import NOON_UTC, in_test_providers, make_config, promo, wait_for

OLD, NEW = b"old-secret-0123456789abcdef", b"new-secret-0123456789abcdef"
DAY = 86400.0


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1].removesuffix(".gif")


class TestLinkSigner:
    def test_an_unsubscribe_link_names_whom_to_withdraw(self) -> None:
        signer = LinkSigner([NEW], "https://gw.example")
        url = signer.unsubscribe_url(
            "acme:m1", Channel.EMAIL, recipient_id="r1", topic="promo", now=NOON_UTC
        )
        payload = signer.verify(token_of(url), now=NOON_UTC + 3600)
        assert isinstance(payload, LinkPayload)
        assert (LinkKind.UNSUBSCRIBE, "acme", "r1", "promo", Channel.EMAIL) == (
            payload.kind,
            payload.tenant,
            payload.recipient_id,
            payload.topic,
            payload.channel,
        )

    def test_links_signed_before_a_rotation_keep_working(self) -> None:
        before = LinkSigner([OLD], "https://gw.example")
        after = LinkSigner([NEW, OLD], "https://gw.example")
        forgotten = LinkSigner([NEW], "https://gw.example")
        old_link = token_of(before.click_url("acme:m1", Channel.SMS, "https://shop", now=NOON_UTC))
        new_link = token_of(after.click_url("acme:m1", Channel.SMS, "https://shop", now=NOON_UTC))
        assert isinstance(after.verify(old_link, now=NOON_UTC), LinkPayload)
        assert isinstance(forgotten.verify(new_link, now=NOON_UTC), LinkPayload)
        assert LinkRejection.BAD_TOKEN == forgotten.verify(old_link, now=NOON_UTC)
        assert LinkRejection.BAD_TOKEN == before.verify(new_link, now=NOON_UTC)  # signs with NEW

    @pytest.mark.parametrize(
        ("kind", "age_seconds", "expected"),
        [
            ("click", 89 * DAY, None),
            ("click", 91 * DAY, LinkRejection.EXPIRED),
            ("open", 91 * DAY, LinkRejection.EXPIRED),
            ("unsubscribe", 364 * DAY, None),
            ("unsubscribe", 399 * DAY, None),
            ("unsubscribe", 401 * DAY, LinkRejection.EXPIRED),
        ],
    )
    def test_links_expire(
        self, kind: str, age_seconds: float, expected: LinkRejection | None
    ) -> None:
        signer = LinkSigner([NEW], "https://gw.example")  # 90 days / 400 days
        url = {
            "click": signer.click_url("acme:m1", Channel.EMAIL, "https://shop", now=NOON_UTC),
            "open": signer.open_pixel_url("acme:m1", Channel.EMAIL, now=NOON_UTC),
            "unsubscribe": signer.unsubscribe_url(
                "acme:m1", Channel.EMAIL, recipient_id="r1", topic="promo", now=NOON_UTC
            ),
        }[kind]
        verdict = signer.verify(token_of(url), now=NOON_UTC + age_seconds)
        if expected is None:
            assert isinstance(verdict, LinkPayload)
        else:
            assert expected == verdict

    def test_a_link_from_the_future_is_refused(self) -> None:
        signer = LinkSigner([NEW], "https://gw.example")
        url = signer.open_pixel_url("acme:m1", Channel.EMAIL, now=NOON_UTC + DAY)
        assert LinkRejection.BAD_TOKEN == signer.verify(token_of(url), now=NOON_UTC)

    @given(st.text(max_size=300))
    def test_no_garbage_verifies(self, garbage: str) -> None:
        signer = LinkSigner([NEW], "https://gw.example")
        assert LinkRejection.BAD_TOKEN == signer.verify(garbage, now=NOON_UTC)

    def test_a_payload_changed_after_signing_is_refused(self) -> None:
        signer = LinkSigner([NEW], "https://gw.example")
        url = signer.unsubscribe_url(
            "acme:m1", Channel.EMAIL, recipient_id="r1", topic="promo", now=NOON_UTC
        )
        body, signature = token_of(url).split(".")
        other = signer.token(
            LinkPayload(
                LinkKind.UNSUBSCRIBE, "acme:m1", Channel.EMAIL, int(NOON_UTC), recipient_id="r2"
            )
        )
        spliced = f"{other.split('.')[0]}.{signature}"
        assert LinkRejection.BAD_TOKEN == signer.verify(spliced, now=NOON_UTC)
        assert isinstance(signer.verify(f"{body}.{signature}", now=NOON_UTC), LinkPayload)


class TestKeptSecret:
    """Without a configured secret, one is made once and kept beside the journal."""

    def test_made_once_with_mode_0600_and_reused(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        first = link_secrets(config, journal_is_new=True)
        second = link_secrets(config, journal_is_new=False)
        path = Path(config.store.path).parent / KEY_FILE
        assert first == second
        assert len(first[0]) >= 32
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)

    def test_a_configured_secret_and_its_predecessors_win(self, tmp_path: Path) -> None:
        config = make_config(
            tmp_path,
            environ={
                "CASCADEGW__TRACKING__SECRET": NEW.decode(),
                "CASCADEGW__TRACKING__PREVIOUS_SECRETS": f"{OLD.decode()}, another-secret-0123456",
            },
        )
        assert [NEW, OLD, b"another-secret-0123456"] == link_secrets(config, journal_is_new=False)
        assert not (Path(config.store.path).parent / KEY_FILE).exists()

    def test_a_lost_key_beside_an_existing_journal_is_an_error_not_a_new_key(
        self, tmp_path: Path
    ) -> None:
        config = make_config(tmp_path)
        with pytest.raises(ConfigError, match="missing beside an existing journal"):
            link_secrets(config, journal_is_new=False)
        assert not (Path(config.store.path).parent / KEY_FILE).exists()

    def test_a_truncated_key_file_is_an_error_not_a_new_key(self, tmp_path: Path) -> None:
        path = tmp_path / KEY_FILE
        path.write_text("short\n")
        with pytest.raises(ConfigError, match="at least 16 bytes"):
            load_or_create(path)

    def test_a_short_configured_secret_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"tracking\.secret: needs at least 16 bytes"):
            load_config(b"", {"CASCADEGW__TRACKING__SECRET": "short"})

    def test_no_secret_configured_means_none(self) -> None:
        config = load_config(b"", {})
        assert [] == tracking_secrets(config.tracking)
        assert 400 * DAY == msgspec.structs.asdict(config.tracking)["unsubscribe_ttl_seconds"]


class TestStrictTokens:
    """Only the one canonical base64url spelling of a token verifies: the lenient decoder
    skipped stray characters and spare bits, so many URLs stood for one link."""

    def valid(self) -> tuple[LinkSigner, str]:
        signer = LinkSigner([NEW], "https://gw.example")
        url = signer.click_url("acme:m1", Channel.EMAIL, "https://shop", now=NOON_UTC)
        return signer, token_of(url)

    # four characters: the length modulo 4, which the lenient decoder's padding needs, holds
    @pytest.mark.parametrize("insert", ["!!!!", "====", "+/+/", "    ", "\n\n\n\n", "%%%%"])
    def test_characters_outside_the_alphabet_are_refused(self, insert: str) -> None:
        signer, token = self.valid()
        assert isinstance(signer.verify(token, now=NOON_UTC), LinkPayload)
        body, signature = token.split(".")
        for forged in (
            f"{body[:4]}{insert}{body[4:]}.{signature}",
            f"{body}.{signature[:3]}{insert}{signature[3:]}",
            f"{body}{insert}.{signature}",
        ):
            assert LinkRejection.BAD_TOKEN == signer.verify(forged, now=NOON_UTC), forged

    def test_padding_and_other_spellings_of_the_same_bytes_are_refused(self) -> None:
        signer, token = self.valid()
        body, signature = token.split(".")
        padded = f"{body}{'=' * (-len(body) % 4)}.{signature}=="
        # 16 signature bytes: 22 characters, the last carrying 4 spare bits
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(signature[-1])
        respelled = f"{body}.{signature[:-1]}{alphabet[last ^ 1]}"
        assert LinkRejection.BAD_TOKEN == signer.verify(padded, now=NOON_UTC)
        assert LinkRejection.BAD_TOKEN == signer.verify(respelled, now=NOON_UTC)


class TestHeadRecordsNothing:
    """Link scanners send HEAD (RFC 9110: safe): it answers as GET would and records nothing."""

    async def test_head_on_click_open_and_unsubscribe_links(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with (
            open_gateway(config, adapters=in_test_providers(config), wall_at_start=NOON_UTC) as gw,
            open_client(gw.ingest_endpoint, timeout_seconds=1e6) as client,
            httpx.AsyncClient(base_url=gw.public_http_url, timeout=1e6) as http,
        ):
            await client.send(promo("m1", channels=["email"]))
            now = gw.clock.now()
            click = gw.links.click_url("acme:m1", Channel.EMAIL, "https://shop.example", now=now)
            pixel = gw.links.open_pixel_url("acme:m1", Channel.EMAIL, now=now)
            unsubscribe = gw.links.unsubscribe_url(
                "acme:m1", Channel.EMAIL, recipient_id="r1", topic="promo", now=now
            )
            paths = [url.removeprefix(gw.links.public_url) for url in (click, pixel, unsubscribe)]
            heads = [await http.head(path) for path in paths]
            gets = [await http.get(path) for path in paths[1:]]  # a GET click would record it
            forged = await http.head("/t/c/forged.token")

            def count(kind: str, verdict: str) -> float:
                value = gw.registry.get_sample_value(
                    "gateway_tracking_requests_total", {"kind": kind, "verdict": verdict}
                )
                return value or 0.0

            # hits are applied in order: once a GET's shows, every HEAD before it would have
            await wait_for(lambda: count("open", "accepted") == 1)
            after_heads = (await client.status("m1", "acme"))["message"]["timeline"]
            bad_after_head = count("click", "bad_token")
            refused = await http.get("/t/c/forged.token")
            await wait_for(lambda: count("click", "bad_token") == 1)
            clicked = await http.get(paths[0])
            await wait_for(lambda: count("click", "accepted") == 1)
            after_get = (await client.status("m1", "acme"))["message"]["timeline"]
            counted = {
                kind: sum(count(kind, verdict) for verdict in ("accepted", "repeat", "bad_token"))
                for kind in ("click", "open", "unsubscribe")
            }
        click_head, pixel_head, page_head = heads
        pixel_get, page_get = gets
        assert (302, "https://shop.example", b"") == (
            click_head.status_code,
            click_head.headers["location"],
            click_head.content,
        )
        assert (302, "https://shop.example") == (clicked.status_code, clicked.headers["location"])
        for head, get in ((pixel_head, pixel_get), (page_head, page_get)):
            assert (get.status_code, b"") == (head.status_code, head.content)
            assert get.headers["content-type"] == head.headers["content-type"]
            assert str(len(get.content)) == head.headers["content-length"]
        assert (404, 404) == (forged.status_code, refused.status_code)
        assert 0 == bad_after_head
        assert "clicked" not in [event["kind"] for event in after_heads]
        assert 1 == [event["kind"] for event in after_get].count("clicked")
        # the GETs' only: one open, a forged click and a click, no unsubscribe refusal
        assert {"click": 2, "open": 1, "unsubscribe": 0} == counted

    async def test_a_token_with_stray_characters_is_404(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with (
            open_gateway(config, adapters=in_test_providers(config), wall_at_start=NOON_UTC) as gw,
            httpx.AsyncClient(base_url=gw.public_http_url, timeout=1e6) as http,
        ):
            url = gw.links.click_url(
                "acme:m1", Channel.EMAIL, "https://shop.example", now=gw.clock.now()
            )
            token = token_of(url)
            genuine = await http.get(f"/t/c/{token}")
            stray = await http.get(f"/t/c/{token[:5]}!!{token[5:]}")
        assert 302 == genuine.status_code
        assert (404, "unknown link") == (stray.status_code, stray.text)
