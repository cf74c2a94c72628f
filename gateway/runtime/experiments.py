"""Experiment assignment at admission: which variant a ``send`` naming an experiment gets.

The core decides the variant (``gateway.core.experiments``); this module resolves the request's
experiment name against the tenant's config, says what the variant changes (channel order,
unread timeouts; its send windows reach the policy through the envelope), and counts the
assignment under the configured, bounded labels.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.config import GatewayConfig
from gateway.core.experiments import Experiment
from gateway.core.model import Channel
from gateway.protocol import SendRequest
from gateway.runtime.metrics import Metrics


class Assignment(msgspec.Struct, frozen=True):
    key: str
    """``"{experiment}/{variant}"``, recorded as the message's ``variant``."""
    channels: tuple[Channel, ...] | None
    step_timeout_seconds: dict[Channel, float]
    counter: Any


class Experiments:
    def __init__(self, config: GatewayConfig, metrics: Metrics) -> None:
        self._experiments: dict[str, dict[str, Experiment]] = {
            tenant: config.experiments(tenant) for tenant in config.tenants
        }
        self._counters = metrics.experiment_arms(
            [
                (tenant, name, variant.name)
                for tenant, experiments in self._experiments.items()
                for name, experiment in experiments.items()
                for variant in experiment.variants
            ]
        )
        self.metrics = metrics

    def assign(self, request: SendRequest, experiment_name: str) -> Assignment | str:
        """The recipient's variant, or why the request is invalid."""
        if request.variant is not None:
            return (
                "variant is assigned by the experiment; leave it out when naming one - at "
                "`$.variant`"
            )
        experiment = self._experiments[request.tenant].get(experiment_name)
        if experiment is None:
            return (
                f"tenant {request.tenant!r} has no experiment {experiment_name!r} - at "
                "`$.experiment`"
            )
        variant = experiment.assign(request.tenant, request.recipient.id)
        return Assignment(
            key=experiment.key(variant),
            channels=variant.channels,
            step_timeout_seconds=dict(variant.step_timeout_seconds),
            counter=self._counters[request.tenant, experiment.name, variant.name],
        )

    def counted(self, assignment: Assignment) -> None:
        """The message was accepted into its variant."""
        self.metrics.assigned(assignment.counter)


def fingerprints(config: GatewayConfig) -> dict[str, str]:
    """``"experiment:{tenant}/{name}"`` -> the definition's fingerprint, for the journal."""
    return {
        f"experiment:{tenant}/{name}": experiment.fingerprint()
        for tenant in config.tenants
        for name, experiment in config.experiments(tenant).items()
    }
