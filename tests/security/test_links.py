"""Tracking links: signed, expiring, verifiable across a secret rotation and a restart."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import load_config, tracking_secrets
from gateway.core.errors import ConfigError
from gateway.core.model import Channel
from gateway.runtime.keyfile import KEY_FILE, link_secrets, load_or_create
from gateway.tracking import LinkKind, LinkPayload, LinkRejection, LinkSigner
from tests.support import NOON_UTC, make_config

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
