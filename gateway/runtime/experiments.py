"""Experiment assignment at admission: which variant a ``send`` naming an experiment gets.

The core decides the variant (``gateway.core.experiments``); this module resolves the request's
experiment name against the tenant's config, says what the variant changes (channel order,
unread timeouts; its send windows reach the policy through the envelope), and counts the
assignment under the configured, bounded labels.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from gateway.config import GatewayConfig
from gateway.core.experiments import Experiment
from gateway.core.model import Category, Channel, RejectReason
from gateway.protocol import SendRequest
from gateway.runtime.metrics import Metrics


class Assignment(msgspec.Struct, frozen=True):
    key: str
    """``"{experiment}/{variant}"``, recorded as the message's ``variant``."""
    arm: tuple[str, str, str]
    """``(tenant, experiment, variant)``: the metric labels."""
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
        if request.category is Category.SERVICE:
            # the control group holds out marketing only: a service message in an experiment
            # would bring held-out recipients into it
            return (
                "experiments are for marketing messages (service messages are never held out, "
                "so the control group could not stay outside) - at `$.experiment`"
            )
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
            arm=(request.tenant, experiment.name, variant.name),
            channels=variant.channels,
            step_timeout_seconds=dict(variant.step_timeout_seconds),
            counter=self._counters[request.tenant, experiment.name, variant.name],
        )

    def counted(self, assignment: Assignment) -> None:
        """The message was accepted into its variant."""
        self.metrics.assigned(assignment.counter)

    def refused(self, assignment: Assignment, reason: RejectReason) -> None:
        """The message was assigned a variant and then refused (no consent or address on the
        variant's channels, a cap, quiet hours): the report, which counts accepted messages,
        does not see it, so the metric must."""
        self.metrics.experiment_refused(assignment.arm, reason)

    def foreign_label(self, request: SendRequest) -> str | None:
        """Why a CRM's own ``variant`` label may not be used: ``"{experiment}/..."`` names an
        arm of a configured experiment, whose report would count a message never assigned."""
        label = request.variant
        if label is None or "/" not in label:
            return None
        prefix = label.partition("/")[0]
        if prefix not in self._experiments.get(request.tenant, {}):
            return None
        return (
            f"variant labels starting {prefix + '/'!r} belong to the tenant's experiment "
            f"{prefix!r}: name it in `experiment` and the gateway assigns the variant - at "
            "`$.variant`"
        )


def fingerprints(config: GatewayConfig) -> dict[str, str]:
    """``"experiment:{tenant}/{name}"`` -> the definition's fingerprint, for the journal.

    What a variant leaves unset it inherits, and what it inherits is part of its definition:
    changing it changes the arm as surely as its weights. So the fingerprint covers each
    variant as it runs: its channel order or the tenant's cascade, its unread timeouts or the
    configured ones of those channels, and, for a variant without windows of its own, the
    tenant's send-window rules. (A request's own ``step_timeout_seconds`` still applies to
    steps a variant leaves unset: per message, not pinned.)
    """
    configured = config.step_timeouts()
    found = {}
    for tenant, settings in config.tenants.items():
        cascade = tuple(settings.cascade)
        rules = config.policy_rules(tenant).send_windows
        for name, experiment in config.experiments(tenant).items():
            variants = []
            for variant in experiment.variants:
                channels = variant.channels if variant.channels is not None else cascade
                own = dict(variant.step_timeout_seconds)
                timeouts = tuple((c, own.get(c, configured[c])) for c in channels)
                variants.append(
                    msgspec.structs.replace(
                        variant, channels=channels, step_timeout_seconds=timeouts
                    )
                )
            resolved = msgspec.structs.replace(experiment, variants=tuple(variants))
            inherited = (
                # categories sorted: a frozenset's order changes with the process's hash seed
                [(sorted(rule.categories), rule.windows) for rule in rules]
                if any(v.windows is None for v in variants)
                else []
            )
            material = msgspec.json.encode((resolved.fingerprint(), inherited))
            found[f"experiment:{tenant}/{name}"] = hashlib.sha256(material).hexdigest()[:16]
    return found
