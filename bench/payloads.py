"""The send request the load generators send: standard library only, so the locustfile (which
runs under gevent and imports nothing of the gateway) and the in-process benchmarks share it."""

from __future__ import annotations

from typing import Any


def promo_send(index: int, *, message_id: str, tenant: str, priority: str) -> dict[str, Any]:
    """A promo for every channel (a service message on the critical lane) to recipient
    ``load-{index}``, whose addresses derive from ``index``."""
    return {
        "v": 1,
        "op": "send",
        "id": message_id,
        "tenant": tenant,
        "category": "promo" if priority != "critical" else "service",
        "priority": priority,
        "recipient": {
            "id": f"load-{index % 1_000_000}",
            "tz": "Europe/Moscow",
            "push_tokens": [f"tok-{index}"],
            "email": f"load{index}@example.com",
            "viber_id": f"vb-{index}",
            "phone": f"+7916{index % 1_000_000:06d}9",
        },
        "content": {
            "push": {"title": "Sale", "body": "Up to 50% off {link}"},
            "email": {"subject": "Sale", "text": "Sale {link}"},
            "viber": {"text": "Sale {link}"},
            "sms": {"text": "Sale {link}"},
            "link_url": "https://shop.example/sale",
        },
    }
