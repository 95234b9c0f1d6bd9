"""Alerts on LoRA adapter health: rules, thresholds, severities and de-duplication.

:func:`check_alerts` evaluates every rule on one check's :class:`~lora_monitor.monitor.metrics.ModuleMetrics` (and,
for the rules that need one, a :class:`~lora_monitor.monitor.history.MetricsHistory`) and returns the conditions
that hold now, one :class:`Alert` per rule and severity, naming every module concerned.
:class:`AlertMonitor` keeps what has been raised and returns only what is new: an alert is raised once per
rule and module, not at every check.

The rules and their default thresholds (:class:`AlertThresholds`, all configurable):

==========================  ==========  =====================================================================
code                        severity    condition
==========================  ==========  =====================================================================
``non_finite``              critical    NaN or Inf in a factor (the module's metrics are recorded as NaN), or
                                        in its frozen base weight (its dominance and update scale are NaN)
``half_restored_adapter``   critical    some rows of lora_B exactly zero while others are not (an adapter
                                        resumed from a checkpoint holding one process's FSDP2 shard)
``dead_adapter``            critical    after 20 steps B is still exactly zero, or the factors have not
                                        changed since the first check (names requires_grad off, learning
                                        rate 0 or missing from the optimizer where it can see which)
``low_effective_rank``      warning     effective rank of ΔW < 0.25 × nominal rank
``ill_conditioned``         warning     κ(A) or κ(B) > 1000 (a rank-deficient factor counts as κ = inf)
``early_rank_collapse``     warning     effective rank fell > 50% below its peak within the first 100 steps
``rank_saturated``          info        effective rank unchanged (±2%) for the last 5 checks
``adapter_dominance``       warning     σmax(ΔW)/σmax(W_base) > 0.3
``adapter_dominance``       critical    σmax(ΔW)/σmax(W_base) > 0.5
``update_scale_too_large``  warning     ‖ΔW‖F/‖W_base‖F > 1 (the update outweighs the frozen weight)
``update_scale_too_small``  info        ‖ΔW‖F/‖W_base‖F < 1e-4 after 100 steps (the adapter barely acts)
==========================  ==========  =====================================================================

A zero ΔW (``B = 0`` at initialization) raises no alert but ``dead_adapter`` (and only once the steps have
passed); rules that need a history wait for enough non-zero checks. The rules themselves are in
:mod:`.rules`, the thresholds in :mod:`.thresholds`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import _io
from .history import MetricsHistory
from .metrics import ModuleMetrics
from .rules import RULES, Rule
from .thresholds import AlertThresholds, Severity

__all__ = ["Alert", "AlertMonitor", "AlertThresholds", "Severity", "check_alerts"]


@dataclass(frozen=True)
class Alert:
    """One condition on one or more modules: what it is, how bad, where, and what to do about it.

    ``values`` maps each module to the value that triggered the rule (effective rank, κ, dominance, ...).
    """

    code: str
    severity: Severity
    modules: tuple[str, ...]
    message: str
    action: str
    step: int | None = None
    values: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The alert as strict-JSON-ready data: an infinite value (κ of a rank-deficient factor) is None."""
        record = asdict(self)
        record["severity"] = self.severity.value
        record["values"] = dict(self.values)
        return _io.json_safe(record)

    def __str__(self) -> str:
        return f"[{self.severity.value}] {self.code}: {self.message} Suggested action: {self.action}"


def check_alerts(
    metrics: Sequence[ModuleMetrics],
    history: MetricsHistory | None = None,
    thresholds: AlertThresholds | Mapping[str, Any] | None = None,
    step: int | None = None,
) -> list[Alert]:
    """Every condition that holds now: one :class:`Alert` per rule and severity, naming its modules.

    Without ``history`` only the rules on a single snapshot are evaluated (the history rules wait).
    """
    limits = AlertThresholds.from_value(thresholds)
    records = {record.name: record for record in metrics}
    alerts = []
    for rule in RULES:
        hits = rule.find(metrics, history, limits, step)
        if hits:
            alerts.append(_alert(rule, hits, records, limits, step))
    return alerts


def _alert(rule: Rule, hits: list[tuple[str, float]], records, limits: AlertThresholds, step) -> Alert:
    """The alert of ``rule`` for ``hits`` (its message names those modules only)."""
    return Alert(
        code=rule.code,
        severity=rule.severity,
        modules=tuple(name for name, _ in hits),
        message=rule.describe(hits, records, limits, step),
        action=rule.action,
        step=step,
        values=dict(hits),
    )


class AlertMonitor:
    """Raises each alert once per (rule, severity, module): :meth:`update` returns only what is new.

    An alert whose modules were all raised before is dropped; one with some new modules is re-issued for
    the new modules only. ``alerts`` holds everything raised so far, ``counts`` how many per code.
    """

    def __init__(self, thresholds: AlertThresholds | Mapping[str, Any] | None = None) -> None:
        self.thresholds = AlertThresholds.from_value(thresholds)
        self.alerts: list[Alert] = []
        # Keyed by the rule, not its code: two rules share "non_finite" (the factors, the base weight), and a
        # module flagged for its base must still be flagged when its factors follow.
        self._raised: set[tuple[Rule, str]] = set()

    def update(
        self,
        metrics: Sequence[ModuleMetrics],
        history: MetricsHistory | None = None,
        step: int | None = None,
        codes: Sequence[str] | None = None,
    ) -> list[Alert]:
        """The alerts new at this check (every rule, or only those whose code is in ``codes``)."""
        # Hits already raised are dropped before any message is written: a condition that persists (a
        # saturated or dominant module) is found again at every check and described only the first time.
        new_alerts, records = [], None
        for rule in RULES if codes is None else [rule for rule in RULES if rule.code in codes]:
            hits = [
                hit
                for hit in rule.find(metrics, history, self.thresholds, step)
                if (rule, hit[0]) not in self._raised
            ]
            if not hits:
                continue
            records = records or {record.name: record for record in metrics}
            self._raised.update((rule, name) for name, _ in hits)
            new_alerts.append(_alert(rule, hits, records, self.thresholds, step))
        self.alerts.extend(new_alerts)
        return new_alerts

    @property
    def counts(self) -> dict[str, int]:
        """Number of alerts raised per ``code/severity``."""
        counts: dict[str, int] = {}
        for alert in self.alerts:
            key = f"{alert.code}/{alert.severity.value}"
            counts[key] = counts.get(key, 0) + 1
        return counts
