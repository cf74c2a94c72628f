"""The Viber adapter (adapters/viber.py) against its pure contract and the real simulator."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import trio
import trio.testing

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected, viber
from adapters._http import make_client
from adapters._transport import HttpResponse
from adapters.simulators._base import Scripted
from adapters.simulators.viber import ViberSimulator
from adapters.viber import ViberSettings
from gateway.clock import wall_time
from gateway.config import Secret, SenderConfig, SimulatorConfig
from gateway.core.errors import (
    AuthRejected,
    InvalidRecipient,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Category, Channel
from gateway.protocol import SmsContent, ViberContent
from tests.adapters.fake_gateway import FakeGateway, Hit
from tests.adapters.settling import Outbound, marker_behaviour

BOT_AUTH = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
CONFIG = ViberSettings(auth_token=Secret(BOT_AUTH))
NOW = 1_795_435_200.0
FAST = SimulatorConfig(receipt_delay_seconds=0.01, read_delay_seconds=0.02, latency_seconds=0)
LINK = "http://gateway.test/t/c/abc.def"


def outgoing(
    *,
    address: str = "vb-read-1",
    text: str = "Hello {name}",
    image_url: str | None = None,
    button_text: str | None = None,
    link_url: str | None = None,
    viber_name: str = "Acme",
    key: str = "acme/msg-1",
) -> Outgoing:
    return Outgoing(
        message_key=key,
        tenant="acme",
        channel=Channel.VIBER,
        category=Category.PROMO,
        address=address,
        content=ViberContent(text=text, image_url=image_url, button_text=button_text),
        brand="Acme",
        sender=SenderConfig(viber_name=viber_name),
        status_callback_url="http://gateway.test/webhooks/viber1",
        link_url=link_url,
    )


def sign(body: bytes, token: str = BOT_AUTH) -> str:
    return hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def callback(event: str, *, timestamp_ms: int = int(NOW * 1000), **fields: object) -> bytes:
    return json.dumps({"event": event, "timestamp": timestamp_ms, **fields}).encode()


def answer(
    body: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> HttpResponse:
    return HttpResponse(status, headers or {}, msgspec.json.encode(body))


# ---------------------------------------------------------------- pure functions
class TestBuildRequest:
    """build_request makes exactly Viber's send_message request."""

    def test_text_message(self) -> None:
        request = viber.build_request(
            outgoing(), config=CONFIG, base_url="https://chatapi.viber.com/", auth_token=BOT_AUTH
        )
        assert request.method == "POST"
        assert str(request.url) == "https://chatapi.viber.com/pa/send_message"
        assert request.headers["x-viber-auth-token"] == BOT_AUTH
        assert request.headers["content-type"] == "application/json"
        assert json.loads(request.body) == {
            "receiver": "vb-read-1",
            "min_api_version": 1,
            "sender": {"name": "Acme"},
            "tracking_data": "acme/msg-1",
            "type": "text",
            "text": "Hello {name}",
        }

    def test_picture_message(self) -> None:
        request = viber.build_request(
            outgoing(image_url="https://cdn.test/a.jpeg"),
            config=CONFIG,
            base_url="http://sim",
            auth_token=BOT_AUTH,
        )
        body = json.loads(request.body)
        assert (
            body["type"],
            body["media"],
            body["text"],
        ) == ("picture", "https://cdn.test/a.jpeg", "Hello {name}")

    @pytest.mark.parametrize(
        ("image_url", "picture"),
        [
            ("https://cdn.test/a.jpeg", True),
            ("https://cdn.test/a.PNG", True),
            ("https://cdn.test/x/a.gif?v=2#top", True),
            ("https://cdn.test/a.jpg", False),  # not among Viber's documented extensions
            ("https://cdn.test/image?id=5.png", False),  # the extension is in the query
            ("https://cdn.test/a.png/view", False),
            ("https://cdn.test/", False),
            ("https://cdn.test/a.webp", False),
        ],
    )
    def test_a_picture_needs_a_media_url_viber_takes(self, image_url: str, picture: bool) -> None:
        body = viber.message_body(outgoing(image_url=image_url))
        expected = ("picture", image_url) if picture else ("text", None)
        assert expected == (body["type"], body.get("media"))
        assert "Hello {name}" == body["text"]

    def test_a_caption_too_long_for_a_picture_goes_as_text(self) -> None:
        text = "x" * 769
        body = viber.message_body(outgoing(text=text, image_url="https://cdn.test/a.png"))
        assert ("text", text) == (body["type"], body["text"])
        assert "media" not in body

    def test_a_caption_of_768_characters_still_goes_as_a_picture(self) -> None:
        body = viber.message_body(outgoing(text="x" * 768, image_url="https://cdn.test/a.png"))
        assert body["type"] == "picture"

    def test_button_becomes_a_link_line(self) -> None:
        body = viber.message_body(outgoing(text="Sale!", button_text="Shop", link_url=LINK))
        assert f"Sale!\n\nShop: {LINK}" == body["text"]

    def test_button_line_is_left_out_when_it_would_pass_7000_characters(self) -> None:
        line = f"\n\nShop: {LINK}"
        fits = "x" * (7000 - len(line))
        body = viber.message_body(outgoing(text=fits, button_text="Shop", link_url=LINK))
        assert (fits + line, 7000) == (body["text"], len(str(body["text"])))
        longer = fits + "y"
        body = viber.message_body(outgoing(text=longer, button_text="Shop", link_url=LINK))
        assert longer == body["text"]

    def test_a_text_over_7000_characters_is_refused(self) -> None:
        with pytest.raises(InvalidRequest, match="7001 characters"):
            viber.message_body(outgoing(text="x" * 7001))
        assert "x" * 7000 == viber.message_body(outgoing(text="x" * 7000))["text"]

    def test_button_does_not_repeat_a_link_already_in_the_text(self) -> None:
        body = viber.message_body(outgoing(text=f"Sale! {LINK}", button_text="Shop", link_url=LINK))
        assert f"Sale! {LINK}" == body["text"]

    def test_button_without_link_is_dropped(self) -> None:
        assert viber.message_body(outgoing(text="Sale!", button_text="Shop"))["text"] == "Sale!"

    def test_sender_name_is_cut_to_viber_limit(self) -> None:
        body = viber.message_body(outgoing(viber_name="N" * 40))
        assert body["sender"] == {"name": "N" * 28}

    def test_refuses_other_content(self) -> None:
        wrong = msgspec.structs.replace(outgoing(), content=SmsContent(text="hi"))
        with pytest.raises(TypeError):
            viber.message_body(wrong)

    def test_set_webhook_request(self) -> None:
        request = viber.build_set_webhook_request(
            base_url="https://chatapi.viber.com", auth_token=BOT_AUTH, url="https://gw/webhooks/v"
        )
        assert str(request.url) == "https://chatapi.viber.com/pa/set_webhook"
        assert request.headers["x-viber-auth-token"] == BOT_AUTH
        assert json.loads(request.body) == {
            "url": "https://gw/webhooks/v",
            "event_types": ["delivered", "seen", "failed", "unsubscribed"],
            "send_name": False,
            "send_photo": False,
        }


class TestParseResponse:
    """parse_response turns Viber's always-200 answers into receipts or precise errors."""

    def test_success_returns_the_message_token(self) -> None:
        token = 5741311803571721087  # beyond 2**53: must survive as an exact integer
        receipt = viber.parse_response(
            answer({"status": 0, "status_message": "ok", "message_token": token}),
            provider="viber1",
        )
        assert SendReceipt(provider_message_id=str(token)) == receipt

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (1, InvalidRequest),
            (2, AuthRejected),
            (3, InvalidRequest),
            (4, InvalidRequest),
            (5, InvalidRecipient),
            (6, InvalidRecipient),
            (7, AuthRejected),
            (8, AuthRejected),
            (9, AuthRejected),
            (10, AuthRejected),
            (11, InvalidRecipient),
            (12, RateLimited),
            (13, InvalidRequest),
            (14, InvalidRequest),
            (15, AuthRejected),
            (16, ProviderUnavailable),
            (19, ProviderUnavailable),
            (999, ProviderUnavailable),
        ],
    )
    def test_status_table(self, status: int, error: type[ProviderError]) -> None:
        with pytest.raises(ProviderError) as caught:
            viber.parse_response(
                answer({"status": status, "status_message": "whatever", "message_token": 1}),
                provider="viber1",
            )
        assert error is type(caught.value)
        assert (str(status), 200, "viber1") == (
            caught.value.code,
            caught.value.status_code,
            caught.value.provider,
        )
        assert error.permanent is caught.value.permanent

    def test_http_429_is_rate_limited_with_retry_after(self) -> None:
        with pytest.raises(RateLimited) as caught:
            viber.parse_response(
                answer({}, status=429, headers={"Retry-After": "7"}), provider="viber1"
            )
        assert caught.value.retry_after_seconds == 7.0

    @pytest.mark.parametrize(
        ("status", "error"),
        [(500, ProviderUnavailable), (503, ProviderUnavailable), (401, AuthRejected)],
    )
    def test_http_errors(self, status: int, error: type[ProviderError]) -> None:
        with pytest.raises(error) as caught:
            viber.parse_response(HttpResponse(status, {}, b"nope"), provider="viber1")
        assert status == caught.value.status_code

    @pytest.mark.parametrize(
        "content", [b"<html>bad gateway</html>", b'{"status": "zero"}', b"{}", b""]
    )
    def test_unreadable_200_is_transient(self, content: bytes) -> None:
        with pytest.raises(ProviderUnavailable):
            viber.parse_response(HttpResponse(200, {}, content), provider="viber1")

    def test_ok_without_token_is_transient(self) -> None:
        with pytest.raises(ProviderUnavailable):
            viber.parse_response(answer({"status": 0}), provider="viber1")

    def test_error_text_never_echoes_the_provider_message(self) -> None:
        with pytest.raises(InvalidRecipient) as caught:
            viber.parse_response(
                answer({"status": 5, "status_message": "vb-secret-user"}), provider="viber1"
            )
        assert "vb-secret-user" not in str(caught.value)


class TestVerifyWebhook:
    """verify_webhook accepts only fresh callbacks signed with the bot's token."""

    def verify(self, body: bytes, headers: dict[str, str], *, now: float = NOW) -> None:
        viber.verify_webhook(
            url="https://gw/webhooks/v", headers=headers, body=body, config=CONFIG, now=now
        )

    @pytest.mark.parametrize(
        "header",
        ["X-Viber-Content-Signature", "x-viber-content-signature", "X-VIBER-CONTENT-SIGNATURE"],
    )
    def test_genuine_passes_whatever_the_header_case(self, header: str) -> None:
        body = callback("delivered", message_token=1, user_id="u")
        self.verify(body, {header: sign(body)})

    def test_uppercase_hex_passes(self) -> None:
        body = callback("delivered", message_token=1, user_id="u")
        self.verify(body, {"X-Viber-Content-Signature": sign(body).upper()})

    def test_the_documented_scheme(self) -> None:
        """Independent of the adapter: hex HMAC-SHA256 of the raw body keyed with the token."""
        assert hmac.new(b"k", b"{}", "sha256").hexdigest() == viber.signature(b"{}", "k")

    @pytest.mark.parametrize(
        ("headers_for", "body"),
        [
            pytest.param(lambda b: {}, callback("seen", message_token=1), id="missing"),
            pytest.param(
                lambda b: {"X-Viber-Content-Signature": sign(b, "other-token")},
                callback("seen", message_token=1),
                id="wrong-token",
            ),
            pytest.param(
                lambda b: {"X-Viber-Content-Signature": sign(b.replace(b"seen", b"xxxx"))},
                callback("seen", message_token=1),
                id="tampered-body",
            ),
            pytest.param(
                lambda b: {"X-Viber-Content-Signature": ""},
                callback("seen", message_token=1),
                id="empty",
            ),
        ],
    )
    def test_bad_signature(
        self, headers_for: Callable[[bytes], dict[str, str]], body: bytes
    ) -> None:
        with pytest.raises(WebhookRejected) as caught:
            self.verify(body, headers_for(body))
        assert caught.value.verdict == "bad_signature"

    def test_without_a_token_nothing_verifies(self) -> None:
        body = callback("seen", message_token=1)
        with pytest.raises(WebhookRejected) as caught:
            viber.verify_webhook(
                url="",
                headers={"X-Viber-Content-Signature": sign(body)},
                body=body,
                config=ViberSettings(),
                now=NOW,
            )
        assert caught.value.verdict == "bad_signature"

    @pytest.mark.parametrize(
        ("age_seconds", "verdict"),
        [
            (0.0, None),
            (601.0, None),  # refused before: a retry after a 10-minute outage
            (50 * 60.0, None),
            (3600.0, None),  # Viber's retries end here
            (7200.0, None),  # and the margin here
            (7201.0, "stale"),
            (-600.0, None),
            (-601.0, "stale"),  # a clock more than ten minutes ahead
        ],
    )
    def test_freshness_covers_vibers_hour_of_retries(
        self, age_seconds: float, verdict: str | None
    ) -> None:
        body = callback("seen", message_token=1, timestamp_ms=int((NOW - age_seconds) * 1000))
        headers = {"X-Viber-Content-Signature": sign(body)}
        if verdict is None:
            self.verify(body, headers)
            return
        with pytest.raises(WebhookRejected) as caught:
            self.verify(body, headers)
        assert verdict == caught.value.verdict

    def test_an_unsubscribed_retried_50_minutes_late_is_accepted(self) -> None:
        body = callback(
            "unsubscribed",
            user_id="jc9HsWTZ2Yf2NkRZ8KcNug==",
            message_token=5,
            timestamp_ms=int((NOW - 3000) * 1000),
        )
        self.verify(body, {"X-Viber-Content-Signature": sign(body)})

    def test_tolerance_is_configurable(self) -> None:
        body = callback("seen", message_token=1, timestamp_ms=int((NOW - 100) * 1000))
        config = ViberSettings(auth_token=Secret(BOT_AUTH), webhook_tolerance_seconds=60.0)
        headers = {"X-Viber-Content-Signature": sign(body)}
        with pytest.raises(WebhookRejected) as caught:
            viber.verify_webhook(url="", headers=headers, body=body, config=config, now=NOW)
        assert "stale" == caught.value.verdict
        self.verify(body, headers)

    @pytest.mark.parametrize(
        "body",
        [b"garbage", b"", b"[]", b'{"event": "seen"}', b'{"event": "seen", "timestamp": "x"}'],
    )
    def test_signed_garbage_is_malformed(self, body: bytes) -> None:
        with pytest.raises(WebhookRejected) as caught:
            self.verify(body, {"X-Viber-Content-Signature": sign(body)})
        assert caught.value.verdict == "malformed"


class TestParseWebhook:
    """parse_webhook maps Viber events to receipts keyed by message_token."""

    def parse(self, body: bytes) -> list[ProviderReceipt]:
        return viber.parse_webhook(url="https://gw/webhooks/v", headers={}, body=body)

    @pytest.mark.parametrize(
        ("event", "kind"),
        [
            ("delivered", ReceiptKind.DELIVERED),
            ("seen", ReceiptKind.READ),
        ],
    )
    def test_receipts(self, event: str, kind: ReceiptKind) -> None:
        body = callback(
            event, timestamp_ms=1457764197627, message_token=4912661846655238145, user_id="u1"
        )
        assert [
            ProviderReceipt(
                kind,
                1457764197.627,
                provider_message_id="4912661846655238145",
                event_id=f"4912661846655238145:{event}:1457764197627",
            )
        ] == self.parse(body)

    def test_failed_keeps_the_description(self) -> None:
        body = callback("failed", message_token=7, user_id="u1", desc="failure desc")
        assert [
            ProviderReceipt(
                ReceiptKind.FAILED,
                NOW,
                provider_message_id="7",
                detail="failure desc",
                event_id=f"7:failed:{int(NOW * 1000)}",
            )
        ] == self.parse(body)

    def test_failed_without_description(self) -> None:
        (receipt,) = self.parse(callback("failed", message_token=7))
        assert (receipt.kind, receipt.detail) == (ReceiptKind.FAILED, None)

    def test_token_as_a_string_is_accepted(self) -> None:
        message_id = "912661846655238145"  # Viber sends it as a string in its SDK tests
        (receipt,) = self.parse(callback("seen", message_token=message_id))
        assert receipt.provider_message_id == "912661846655238145"

    def test_unsubscribed_names_the_user_not_a_message(self) -> None:
        body = callback("unsubscribed", user_id="jc9HsWTZ2Yf2NkRZ8KcNug==", message_token=99)
        assert [
            ProviderReceipt(
                ReceiptKind.UNSUBSCRIBED,
                NOW,
                detail="jc9HsWTZ2Yf2NkRZ8KcNug==",
                event_id=f"99:unsubscribed:{int(NOW * 1000)}",
            )
        ] == self.parse(body)

    def test_the_event_id_never_holds_the_user_id(self) -> None:
        (receipt,) = self.parse(callback("unsubscribed", user_id="jc9HsWTZ2Yf2NkRZ8KcNug=="))
        assert (ReceiptKind.UNSUBSCRIBED, None) == (receipt.kind, receipt.event_id)

    def test_the_same_event_at_another_time_is_another_event(self) -> None:
        first = self.parse(callback("seen", message_token=3, timestamp_ms=1000))
        later = self.parse(callback("seen", message_token=3, timestamp_ms=2000))
        assert ["3:seen:1000", "3:seen:2000"] == [r.event_id for r in first + later]

    @pytest.mark.parametrize(
        "event", ["webhook", "subscribed", "conversation_started", "message", "client_status"]
    )
    def test_other_events_give_nothing(self, event: str) -> None:
        assert self.parse(callback(event, message_token=1, user_id="u")) == []

    @pytest.mark.parametrize(
        "body",
        [
            callback("delivered", user_id="u"),
            callback("unsubscribed", message_token=3),
            b"not json",
            b'{"timestamp": 1}',
        ],
    )
    def test_malformed(self, body: bytes) -> None:
        with pytest.raises(WebhookRejected) as caught:
            self.parse(body)
        assert caught.value.verdict == "malformed"


class TestAdapterConstruction:
    def test_needs_a_token(self) -> None:
        from gateway.core.errors import ConfigError

        with pytest.raises(ConfigError):
            viber.ViberAdapter("viber1", ViberSettings(), make_client(timeout_seconds=5))

    async def test_defaults_to_viber_and_closes_nothing(self) -> None:
        async with make_client(timeout_seconds=5) as client:
            adapter = viber.ViberAdapter("viber1", CONFIG, client)
            assert (
                adapter.name,
                adapter.channel,
                viber.KIND,
                viber.CHANNEL,
            ) == ("viber1", Channel.VIBER, "viber", Channel.VIBER)
            assert adapter._base_url == "https://chatapi.viber.com"
            await adapter.aclose()
            assert not client.is_closed


# ---------------------------------------------------------------- against the simulator
@dataclass
class Rig:
    sim: ViberSimulator
    gateway: FakeGateway
    config: ViberSettings
    adapter: viber.ViberAdapter
    outbound: Outbound

    def webhook_url(self) -> str:
        return f"{self.gateway.url}/webhooks/viber1"

    async def settled(self) -> list[Hit]:
        """The hits not taken yet, once everything sent so far has been called back.

        Proven rather than waited for (tests/adapters/settling.py): a marker message whose
        recipient taps a link after every callback scheduled so far falls due, then every post
        and tap the simulator started. The marker's own callbacks are left out.
        """
        behaviour = self.sim.behaviour
        self.sim.behaviour = marker_behaviour(behaviour)
        try:
            marker = await self.adapter.send(
                outgoing(
                    address="vb-click-marker",
                    text=f"Marker {self.gateway.url}/t/c/marker",
                    key="acme/marker",
                )
            )
        finally:
            self.sim.behaviour = behaviour
        assert marker.provider_message_id is not None
        token = int(marker.provider_message_id)
        with trio.fail_after(10):
            hits = await self.gateway.until(
                lambda hit: hit.kind == "click" and hit.url.endswith("/t/c/marker")
            )
            await self.outbound.drained()
        hits = hits[:-1] + self.gateway.received()
        return [
            hit
            for hit in hits
            if hit.kind != "webhook" or json.loads(hit.body).get("message_token") != token
        ]

    def verified(self, hit: Hit) -> list[ProviderReceipt]:
        viber.verify_webhook(
            url=hit.url, headers=hit.headers, body=hit.body, config=self.config, now=wall_time()
        )
        return viber.parse_webhook(url=hit.url, headers=hit.headers, body=hit.body)


@asynccontextmanager
async def rig(behaviour: SimulatorConfig = FAST) -> AsyncIterator[Rig]:
    sim = ViberSimulator(name="viber1", behaviour=behaviour, seed=7)
    outbound = Outbound(sim)
    gateway = FakeGateway()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        await nursery.start(gateway.serve)
        provider = msgspec.structs.replace(ViberSettings(), **sim.credentials())
        async with make_client(timeout_seconds=5) as client:
            adapter = viber.ViberAdapter("viber1", provider, client)
            yield Rig(sim, gateway, provider, adapter, outbound)
        nursery.cancel_scope.cancel()


class TestAgainstSimulator:
    """The adapter and the simulator speak the same Viber API over real HTTP."""

    async def test_send_returns_the_token_and_sends_viber_json(self) -> None:
        async with rig() as r:
            receipt = await r.adapter.send(outgoing(address="vb-ignore-1"))
            (recorded,) = r.sim.requests
            assert recorded.path == "/pa/send_message"
            assert r.sim.auth_token == recorded.headers["x-viber-auth-token"]
            assert json.loads(recorded.body)["receiver"] == "vb-ignore-1"
            assert receipt.provider_message_id is not None
            assert int(receipt.provider_message_id) > 0

    @pytest.mark.parametrize(
        ("caption", "image_url"),
        [
            ("Spring sale " + "x" * (768 - 12), "https://cdn.test/spring/sale.png?v=3"),
            ("Sale", "https://cdn.test/a.JPEG"),
            ("Sale", "http://cdn.test/b/c.gif#top"),
        ],
        ids=["768-character-caption", "jpeg", "gif"],
    )
    async def test_a_picture_message_is_what_viber_requires(
        self, caption: str, image_url: str
    ) -> None:
        """Viber's picture message (send_message, ``type: "picture"``): ``text`` is required,
        at most 768 characters; ``media`` is required, the http(s) URL of a JPEG, PNG or GIF
        "with a .jpeg, .png or .gif file extension as the last path segment"; ``thumbnail`` is
        optional, a reduced image of at most 100 KB, so the picture itself is no thumbnail:
        having none, the adapter must send none. A message is at most 30 KB.

        Checked on the request as it reached the simulator, against those rules written out
        here, not against the adapter's own constants."""
        async with rig() as r:
            receipt = await r.adapter.send(
                outgoing(address="vb-ignore-1", text=caption, image_url=image_url)
            )
            (recorded,) = r.sim.requests
        body = json.loads(recorded.body)
        assert receipt.provider_message_id is not None  # accepted, status 0
        assert {
            "receiver",
            "min_api_version",
            "sender",
            "tracking_data",
            "type",
            "text",
            "media",
        } == set(body)  # no thumbnail
        assert ("picture", caption, image_url) == (body["type"], body["text"], body["media"])
        assert isinstance(body["text"], str)
        assert len(body["text"]) <= 768
        media = urlsplit(body["media"])
        assert media.scheme in ("http", "https")
        assert media.path.rsplit("/", 1)[-1].lower().endswith((".jpeg", ".png", ".gif"))
        assert len(recorded.body) <= 30 * 1024

    @pytest.mark.parametrize(
        ("text", "image_url"),
        [
            ("x" * 769, "https://cdn.test/a.png"),  # a caption Viber would refuse
            ("Sale", "https://cdn.test/a.jpg"),  # an extension Viber does not name
            ("Sale", "https://cdn.test/image?id=5.png"),  # the extension is in the query
        ],
    )
    async def test_an_image_viber_would_refuse_goes_as_text_without_it(
        self, text: str, image_url: str
    ) -> None:
        async with rig() as r:
            await r.adapter.send(outgoing(address="vb-ignore-1", text=text, image_url=image_url))
            (recorded,) = r.sim.requests
        body = json.loads(recorded.body)
        assert ("text", text) == (body["type"], body["text"])
        assert not {"media", "thumbnail"} & set(body)

    async def test_an_overlong_text_is_refused_before_any_request(self) -> None:
        async with rig() as r:
            with pytest.raises(InvalidRequest, match=r"^viber1: "):
                await r.adapter.send(outgoing(address="vb-ignore-1", text="x" * 7001))
            assert [] == r.sim.requests

    @pytest.mark.parametrize(
        ("address", "error", "code", "status_code"),
        [
            ("vb-invalid-1", InvalidRecipient, "5", 200),
            ("vb-fail-1", ProviderUnavailable, None, 503),
        ],
    )
    async def test_tagged_failures(
        self, address: str, error: type[ProviderError], code: str | None, status_code: int
    ) -> None:
        async with rig() as r:
            with pytest.raises(error) as caught:
                await r.adapter.send(outgoing(address=address))
            assert (code, status_code) == (caught.value.code, caught.value.status_code)

    async def test_throttle_is_status_12_then_accepted(self) -> None:
        async with rig() as r:
            with pytest.raises(RateLimited) as caught:
                await r.adapter.send(outgoing(address="vb-throttle-1"))
            assert (caught.value.code, caught.value.status_code) == ("12", 200)
            await r.adapter.send(outgoing(address="vb-throttle-1"))

    async def test_scripted_http_429_keeps_retry_after(self) -> None:
        async with rig() as r:
            r.sim.script.append(
                Scripted(status=429, body={"error": "slow down"}, headers={"Retry-After": "3"})
            )
            with pytest.raises(RateLimited) as caught:
                await r.adapter.send(outgoing(address="vb-ignore-1"))
            assert (caught.value.status_code, caught.value.retry_after_seconds) == (429, 3.0)

    async def test_scripted_viber_status(self) -> None:
        async with rig() as r:
            r.sim.script.append(Scripted(status=200, body={"status": 6, "status_message": "x"}))
            with pytest.raises(InvalidRecipient) as caught:
                await r.adapter.send(outgoing(address="vb-ignore-1"))
            assert caught.value.code == "6"

    async def test_wrong_token_is_auth_rejected(self) -> None:
        async with rig() as r:
            config = msgspec.structs.replace(r.config, auth_token=Secret("wrong"))
            async with make_client(timeout_seconds=5) as client:
                adapter = viber.ViberAdapter("viber1", config, client)
                with pytest.raises(AuthRejected) as caught:
                    await adapter.send(outgoing(address="vb-ignore-1"))
            assert caught.value.code == "2"

    async def test_too_long_sender_name_is_refused(self) -> None:
        """What build_request guards against: the simulator checks Viber's 28 characters."""
        async with rig() as r:
            body = viber.message_body(outgoing(address="vb-ignore-1"))
            body["sender"] = {"name": "N" * 29}
            status = await self._post_raw(r, body)
            assert status == 3

    @pytest.mark.parametrize(
        ("change", "status"),
        [
            ({"receiver": None}, 4),
            ({"text": None}, 4),
            ({"sender": {}}, 4),
            ({"type": "carousel"}, 3),
            ({"text": 7}, 3),
            ({"text": "x" * 7001}, 3),
            ({"min_api_version": "1"}, 3),
            ({"type": "picture"}, 4),
            ({"type": "picture", "media": "ftp://x/a.jpg"}, 3),
            ({"type": "picture", "media": "https://x/a.jpeg", "text": "x" * 769}, 3),
            ({"type": "picture", "media": "https://x/image?id=1"}, 3),
            ({"type": "picture", "media": "https://x/a.gif"}, 0),
        ],
    )
    async def test_request_validation(self, change: dict[str, object], status: int) -> None:
        async with rig() as r:
            body = viber.message_body(outgoing(address="vb-ignore-1"))
            body.update(change)
            body = {k: v for k, v in body.items() if v is not None}
            assert status == await self._post_raw(r, body)

    async def test_non_json_is_bad_data(self) -> None:
        async with rig() as r, httpx.AsyncClient() as client:
            response = await client.post(
                f"{r.sim.url}/pa/send_message",
                content=b"{not json",
                headers={"X-Viber-Auth-Token": r.sim.auth_token},
            )
            assert (response.status_code, response.json()["status"]) == (200, 3)

    async def _post_raw(self, r: Rig, body: dict[str, object]) -> int:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{r.sim.url}/pa/send_message",
                json=body,
                headers={"X-Viber-Auth-Token": r.sim.auth_token},
            )
        assert response.status_code == 200
        status: int = response.json()["status"]
        return status


class TestWebhooksFromSimulator:
    """Callbacks arrive signed so that verify_webhook accepts them and parse_webhook reads them."""

    async def test_set_webhook_is_checked_with_a_signed_callback(self) -> None:
        async with rig() as r:
            await r.adapter.set_webhook(r.webhook_url())
            (check,) = await r.gateway.hits(1)
            assert r.verified(check) == []
            assert json.loads(check.body)["event"] == "webhook"
            assert r.webhook_url() == r.sim.webhook_url
            assert {"delivered", "seen", "failed"} == r.sim.event_types  # unsubscribed: always
            (request,) = [x for x in r.sim.requests if x.path == "/pa/set_webhook"]
            assert "unsubscribed" in json.loads(request.body)["event_types"]

    async def test_set_webhook_refused_when_the_url_does_not_answer_200(self) -> None:
        async with rig() as r:
            r.gateway.webhook_status = 500
            with pytest.raises(InvalidRequest) as caught:
                await r.adapter.set_webhook(r.webhook_url())
            assert caught.value.code == "1"
            assert r.sim.webhook_url == ""

    async def test_read_gives_delivered_then_seen(self) -> None:
        async with rig() as r:
            await r.adapter.set_webhook(r.webhook_url())
            await r.gateway.hits(1)
            receipt = await r.adapter.send(outgoing(address="vb-read-1"))
            receipts = [x for hit in await r.gateway.hits(2) for x in r.verified(hit)]
            assert sorted(
                (x.kind for x in receipts), key=[ReceiptKind.DELIVERED, ReceiptKind.READ].index
            ) == [ReceiptKind.DELIVERED, ReceiptKind.READ]
            assert {receipt.provider_message_id} == {x.provider_message_id for x in receipts}
            assert all(x.message_key is None for x in receipts)
            assert all(abs(x.at - wall_time()) < 5 for x in receipts)
            assert [] == await r.settled()

    async def test_click_opens_the_tracked_link(self) -> None:
        async with rig() as r:
            r.sim.webhook_url = r.webhook_url()
            await r.adapter.send(
                outgoing(address="vb-click-1", text=f"Sale! {r.gateway.url}/t/c/abc.def")
            )
            hits = await r.gateway.hits(3)
            kinds = sorted(hit.kind for hit in hits)
            assert kinds == ["click", "webhook", "webhook"]
            (click,) = [hit for hit in hits if hit.kind == "click"]
            assert click.url.endswith("/t/c/abc.def")
            with trio.fail_after(5):
                await r.outbound.drained()  # the tap has had the redirect
            assert r.sim.clicks == [302]
            assert [] == await r.settled()

    async def test_bounce_gives_failed(self) -> None:
        async with rig() as r:
            r.sim.webhook_url = r.webhook_url()
            receipt = await r.adapter.send(outgoing(address="vb-bounce-1"))
            (hit,) = await r.gateway.hits(1)
            (failed,) = r.verified(hit)
            assert (ReceiptKind.FAILED, receipt.provider_message_id) == (
                failed.kind,
                failed.provider_message_id,
            )
            assert [] == await r.settled()

    async def test_unsubscribe_names_the_viber_user(self) -> None:
        async with rig() as r:
            r.sim.webhook_url = r.webhook_url()
            await r.adapter.send(outgoing(address="vb-unsub-1"))
            receipts = [x for hit in await r.gateway.hits(2) for x in r.verified(hit)]
            (unsub,) = [x for x in receipts if x.kind is ReceiptKind.UNSUBSCRIBED]
            assert (
                unsub.message_key,
                unsub.provider_message_id,
                unsub.detail,
            ) == (None, None, "vb-unsub-1")

    async def test_a_replayed_unsubscribed_is_the_same_event_and_still_verifies(self) -> None:
        async with rig() as r:
            # no "delivered": the unsubscribed (which always comes) is the only callback, so
            # it is the last webhook, the one replay posts again
            await r.adapter.set_webhook(r.webhook_url(), event_types=("failed",))
            await r.gateway.hits(1)
            await r.adapter.send(outgoing(address="vb-unsub-1"))
            (unsubscribed,) = await r.gateway.hits(1)
            assert "unsubscribed" == json.loads(unsubscribed.body)["event"]
            assert [200, 200] == await r.sim.replay(2)
            retries = await r.gateway.hits(2)
            assert [] == await r.settled()
        assert all(unsubscribed.body == retry.body for retry in retries)
        (first,) = r.verified(unsubscribed)
        assert first.event_id is not None
        assert first.event_id.split(":")[1:] == [
            "unsubscribed",
            str(json.loads(unsubscribed.body)["timestamp"]),
        ]
        for retry in retries:
            # Viber retries for an hour: 50 minutes on, a retry still verifies
            viber.verify_webhook(
                url=retry.url,
                headers=retry.headers,
                body=retry.body,
                config=r.config,
                now=wall_time() + 3000,
            )
            assert [first] == viber.parse_webhook(
                url=retry.url, headers=retry.headers, body=retry.body
            )

    async def test_filtered_event_types_are_not_sent(self) -> None:
        async with rig() as r:
            await r.adapter.set_webhook(r.webhook_url(), event_types=("failed",))
            await r.gateway.hits(1)
            await r.adapter.send(outgoing(address="vb-read-1"))  # delivered, seen: filtered
            bounced = await r.adapter.send(outgoing(address="vb-bounce-1", key="acme/msg-2"))
            events = [json.loads(hit.body) for hit in await r.settled()]
        assert [("failed", bounced.provider_message_id)] == [
            (event["event"], str(event["message_token"])) for event in events
        ]

    async def test_no_webhook_no_callbacks(self) -> None:
        async with rig() as r:
            await r.adapter.send(outgoing(address="vb-read-1"))
            await r.adapter.send(outgoing(address="vb-bounce-1", key="acme/msg-2"))
            assert [] == await r.settled()
            assert r.sim.webhook_statuses == []

    async def test_timestamps_are_wall_time_under_a_mock_clock(
        self, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with rig() as r:
            r.sim.webhook_url = r.webhook_url()
            await r.adapter.send(outgoing(address="vb-ignore-1"))
            (hit,) = await r.gateway.hits(1)
            (delivered,) = r.verified(hit)  # would be "stale" with trio's clock as epoch
            assert ReceiptKind.DELIVERED is delivered.kind
