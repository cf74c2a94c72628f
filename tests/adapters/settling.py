"""Knowing that a simulator has sent everything it was going to, without waiting a while.

A test that asserts a callback did *not* come must first prove that it would have come by now;
"nothing arrived within 0.1 s" passes just as well when the callback is merely slow. Two facts
about the simulators (adapters/simulators/_base.py) give that proof:

- Order. A simulator runs each scheduled callback (a webhook post, a tapped link) as its own
  task, started when it falls due, earliest first. So when a *marker* message whose callback is
  due after every callback scheduled before it has its callback arrive, every earlier callback
  has started; one that decided to send nothing (no webhook URL, a filtered event type) has
  finished too, since deciding takes no waiting. ``marker_behaviour`` gives the delays that put
  the marker's callbacks after everything already scheduled.
- Completion. ``Outbound`` counts the webhook posts and link taps the simulator starts and
  finishes (through its own ``post_webhook`` and ``tap``, which still do the work). Once the
  marker has arrived and ``drained`` returns, every callback that was started has reached the
  test's endpoint, or failed to.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import trio

from adapters.simulators._base import Simulator
from gateway.config import SimulatorConfig


class Outbound:
    """How many webhook posts and link taps ``simulator`` has started and finished."""

    def __init__(self, simulator: Simulator) -> None:
        self.started = 0
        self.finished = 0
        self._progress = trio.Event()
        post_webhook, tap = simulator.post_webhook, simulator.tap

        async def counted_post(url: str, *, content: bytes, headers: Mapping[str, str]) -> int:
            self.started += 1
            try:
                return await post_webhook(url, content=content, headers=headers)
            finally:
                self._finish()

        async def counted_tap(url: str) -> None:
            self.started += 1
            try:
                await tap(url)
            finally:
                self._finish()

        # the simulator looks both up on itself when it sends, so these see every send
        setattr(simulator, "post_webhook", counted_post)  # noqa: B010 - an instance's method
        setattr(simulator, "tap", counted_tap)  # noqa: B010

    def _finish(self) -> None:
        self.finished += 1
        self._progress.set()
        self._progress = trio.Event()

    async def drained(self) -> None:
        """Return once every post and tap started so far has finished (bounded by the caller)."""
        while self.finished < self.started:
            await self._progress.wait()


def marker_behaviour(behaviour: SimulatorConfig) -> SimulatorConfig:
    """Delays under which every callback of a message sent now falls due after every callback
    already scheduled under ``behaviour``.

    Callbacks fall due at most ``2.25 * receipt + 3 * read`` after their message (each delay is
    jittered to between 0.5 and 1.5 times the configured one; Twilio's ``sent`` takes half a
    receipt delay, Viber's tap follows two read delays), which is under ``bound``. The earliest
    callback a test waits for on a marker (Viber's and Twilio's tap, FCM's tap, SendGrid's
    first batch) comes at least half a delay of the marker's after it: at least ``bound``.
    """
    bound = 3 * (behaviour.receipt_delay_seconds + behaviour.read_delay_seconds)
    assert bound > 0, "with no delays, callbacks are not ordered by their messages"
    return msgspec.structs.replace(
        behaviour, receipt_delay_seconds=2 * bound, read_delay_seconds=2 * bound
    )
