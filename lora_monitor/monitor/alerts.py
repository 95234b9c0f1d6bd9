"""Alerts on LoRA adapter health: rules, thresholds, severities and de-duplication.

:func:`check_alerts` evaluates every rule on one check's :class:`~lora_monitor.metrics.ModuleMetrics` (and,
for the rules that need one, a :class:`~lora_monitor.metrics.MetricsHistory`) and returns the conditions
that hold now, one :class:`Alert` per rule and severity, naming every module concerned.
:class:`AlertMonitor` keeps what has been raised and returns only what is new: an alert is raised once per
rule and module, not at every check.

The rules and their default thresholds (:class:`AlertThresholds`, all configurable):

==========================  ==========  =====================================================================
code                        severity    condition
==========================  ==========  =====================================================================
``low_effective_rank``      warning     effective rank of ΔW < 0.25 × nominal rank
``ill_conditioned``         warning     κ(A) or κ(B) > 1000 (a rank-deficient factor counts as κ = inf)
``early_rank_collapse``     warning     effective rank fell > 50% below its peak within the first 100 steps
``rank_saturated``          info        effective rank unchanged (±2%) for the last 5 checks
``adapter_dominance``       warning     σmax(ΔW)/σmax(W_base) > 0.3
``adapter_dominance``       critical    σmax(ΔW)/σmax(W_base) > 0.5
``update_scale_too_large``  warning     ‖ΔW‖F/‖W_base‖F > 1 (the update outweighs the frozen weight)
``update_scale_too_small``  info        ‖ΔW‖F/‖W_base‖F < 1e-4 after 100 steps (the adapter barely acts)
==========================  ==========  =====================================================================

A zero ΔW (``B = 0`` at initialization) never raises an alert; rules that need a history wait for enough
non-zero checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from .. import _io as serialization
from ..errors import LoraMonitorError
from .metrics import MetricsHistory, ModuleMetrics


class Severity(str, Enum):
    """How urgent an alert is."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


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
        return serialization.json_safe(record)

    def __str__(self) -> str:
        return f"[{self.severity.value}] {self.code}: {self.message} Suggested action: {self.action}"


@dataclass(frozen=True)
class AlertThresholds:
    """Thresholds of every rule (defaults from the LoRA research agenda).

    Checked when made: every threshold is a number (the step and check counts whole numbers) in its range,
    and ``dominance_warning ≤ dominance_critical``, ``update_scale_low ≤ update_scale_high``; anything
    else raises :class:`~lora_monitor.errors.LoraMonitorError` naming the threshold and its value. An
    upper limit may be ``inf`` to switch its rule off.
    """

    low_rank_fraction: float = 0.25
    max_condition_number: float = 1000.0
    early_collapse_drop: float = 0.5
    early_collapse_steps: int = 100
    saturation_checks: int = 5
    saturation_tolerance: float = 0.02
    dominance_warning: float = 0.3
    dominance_critical: float = 0.5
    update_scale_high: float = 1.0
    update_scale_low: float = 1e-4
    update_scale_low_after_steps: int = 100

    def __post_init__(self) -> None:
        for name, allowed in _THRESHOLD_RANGES.items():
            _check_threshold(name, getattr(self, name), allowed)
        for lower, upper in (
            ("dominance_warning", "dominance_critical"),
            ("update_scale_low", "update_scale_high"),
        ):
            if getattr(self, lower) > getattr(self, upper):
                raise LoraMonitorError(
                    f"alert threshold {lower}={getattr(self, lower)!r} must not exceed "
                    f"{upper}={getattr(self, upper)!r}"
                )

    @classmethod
    def from_value(cls, value: AlertThresholds | Mapping[str, Any] | None) -> AlertThresholds:
        """Thresholds from None (defaults), an :class:`AlertThresholds`, or a dict of overrides."""
        if value is None:
            return cls()
        if isinstance(value, AlertThresholds):
            return value
        if not isinstance(value, Mapping):
            raise LoraMonitorError(
                f"alert thresholds must be an AlertThresholds or a dict of overrides, got {value!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(value) - known)
        if unknown:
            raise LoraMonitorError(
                f"unknown alert threshold(s) {unknown}; the thresholds are {sorted(known)}"
            )
        return replace(cls(), **dict(value))


@dataclass(frozen=True)
class _Range:
    """Allowed values of one threshold: ``kind`` (int: whole numbers only), bounds, and whether ``inf``
    (which switches an upper-limit rule off) is allowed."""

    kind: type
    low: float
    high: float = math.inf
    positive: bool = False  # low excluded: the threshold must be above it
    infinite_ok: bool = False


_THRESHOLD_RANGES: dict[str, _Range] = {
    "low_rank_fraction": _Range(float, 0.0, 1.0),  # rank utilization is at most 1; 0 switches the rule off
    "max_condition_number": _Range(float, 1.0, infinite_ok=True),  # κ is at least 1
    "early_collapse_drop": _Range(float, 0.0, 1.0, positive=True),  # a fraction of the peak
    "early_collapse_steps": _Range(int, 0),
    "saturation_checks": _Range(int, 2),  # one check alone is trivially unchanged
    "saturation_tolerance": _Range(float, 0.0),  # 0: exactly unchanged
    "dominance_warning": _Range(float, 0.0, positive=True, infinite_ok=True),
    "dominance_critical": _Range(float, 0.0, positive=True, infinite_ok=True),
    "update_scale_high": _Range(float, 0.0, positive=True, infinite_ok=True),
    "update_scale_low": _Range(float, 0.0),  # 0 switches the rule off
    "update_scale_low_after_steps": _Range(int, 0),
}


def _check_threshold(name: str, value: Any, allowed: _Range) -> None:
    """Raise :class:`LoraMonitorError` naming ``name`` and ``value`` unless it is a number in range."""
    # bool is an int subclass, but True is no threshold.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if allowed.kind is int and not (is_number and isinstance(value, int)):
        raise LoraMonitorError(f"alert threshold {name} must be a whole number, got {value!r}")
    if not is_number:
        raise LoraMonitorError(f"alert threshold {name} must be a number, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allowed.infinite_ok):
        raise LoraMonitorError(f"alert threshold {name} must be a finite number, got {value!r}")
    too_low = value <= allowed.low if allowed.positive else value < allowed.low
    if too_low or value > allowed.high:
        lowest = f"above {allowed.low:g}" if allowed.positive else f"at least {allowed.low:g}"
        highest = "" if math.isinf(allowed.high) else f" and at most {allowed.high:g}"
        raise LoraMonitorError(f"alert threshold {name} must be {lowest}{highest}, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------

_Hit = tuple[str, float]  # (module name, triggering value)


@dataclass(frozen=True)
class _Rule:
    code: str
    severity: Severity
    find: Callable[[Sequence[ModuleMetrics], MetricsHistory | None, AlertThresholds, int | None], list[_Hit]]
    describe: Callable[[list[_Hit], Mapping[str, ModuleMetrics], AlertThresholds, int], str]
    action: str


def _live(metrics: Sequence[ModuleMetrics]) -> list[ModuleMetrics]:
    return [record for record in metrics if not record.is_zero]


def _low_rank(metrics, history, limits, step) -> list[_Hit]:
    return [
        (m.name, m.rank_utilization) for m in _live(metrics) if m.rank_utilization < limits.low_rank_fraction
    ]


def _ill_conditioned(metrics, history, limits, step) -> list[_Hit]:
    hits = []
    for m in _live(metrics):
        worst = max(m.kappa_A, m.kappa_B)
        if worst > limits.max_condition_number:
            hits.append((m.name, worst))
    return hits


def _dominance(low: str, high: str | None):
    def find(metrics, history, limits, step) -> list[_Hit]:
        hits = []
        for m in _live(metrics):
            if m.dominance is None:
                continue
            above_low = m.dominance > getattr(limits, low)
            below_high = high is None or m.dominance <= getattr(limits, high)
            if above_low and below_high:
                hits.append((m.name, m.dominance))
        return hits

    return find


def _scale_high(metrics, history, limits, step) -> list[_Hit]:
    return [
        (m.name, m.update_scale)
        for m in _live(metrics)
        if m.update_scale is not None and m.update_scale > limits.update_scale_high
    ]


def _scale_low(metrics, history, limits, step) -> list[_Hit]:
    # Early in training ΔW grows from zero: a small update is expected then, not a mismatch.
    if step is None or step < limits.update_scale_low_after_steps:
        return []
    return [
        (m.name, m.update_scale)
        for m in _live(metrics)
        if m.update_scale is not None and m.update_scale < limits.update_scale_low
    ]


def _early_collapse(metrics, history, limits, step) -> list[_Hit]:
    if history is None:
        return []
    hits = []
    for m in _live(metrics):
        series = history.series(m.name, nominal_rank=m.nominal_rank)
        early = [(s, v) for s, v in series if s <= limits.early_collapse_steps]
        if len(early) < 2:
            continue
        peak_index = max(range(len(early)), key=lambda i: early[i][1])
        peak = early[peak_index][1]
        later = [v for _, v in early[peak_index + 1 :]]
        if later and peak > 0 and min(later) < (1 - limits.early_collapse_drop) * peak:
            hits.append((m.name, 1 - min(later) / peak))
    return hits


def _saturated(metrics, history, limits, step) -> list[_Hit]:
    if history is None:
        return []
    # One definition of "unchanged" (MetricsHistory's), with this rule's thresholds; it compares only the
    # checks at the module's current rank, so a resize starts the count over.
    return [
        (m.name, m.effective_rank)
        for m in _live(metrics)
        if history.saturated_since(
            m.name, tolerance=limits.saturation_tolerance, checks=limits.saturation_checks
        )
        is not None
    ]


def _examples(hits: list[_Hit], limit: int = 3) -> list[_Hit]:
    return hits[:limit]


def _and_more(hits: list[_Hit], limit: int = 3) -> str:
    return f" and {len(hits) - limit} more" if len(hits) > limit else ""


def _count(hits: list[_Hit], records: Mapping[str, ModuleMetrics]) -> str:
    total = len(records)
    return f"{len(hits)} of {total} LoRA module{'s' if total != 1 else ''}"


def _describe_low_rank(hits, records, limits, total) -> str:
    parts = ", ".join(
        f"{name} uses {100 * value:.0f}% of rank {records[name].nominal_rank} "
        f"(effective rank {records[name].effective_rank:.1f})"
        for name, value in _examples(hits)
    )
    return (
        f"{_count(hits, records)} use less than {100 * limits.low_rank_fraction:.0f}% of their configured "
        f"rank: {parts}{_and_more(hits)}."
    )


def _describe_ill_conditioned(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} (κ = {_format(value)})" for name, value in _examples(hits))
    return (
        f"LoRA matrices are becoming ill-conditioned: {_count(hits, records)} have a factor A or B with a "
        f"condition number above {limits.max_condition_number:g}: {parts}{_and_more(hits)}."
    )


def _describe_dominance(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} (ρ = {value:.2f})" for name, value in _examples(hits))
    return (
        f"The adapter's update is large next to the frozen weight in {_count(hits, records)}: "
        f"σmax(ΔW)/σmax(W) is {parts}{_and_more(hits)}; above {limits.dominance_warning:g} the adapter "
        f"modifies the base significantly, above {limits.dominance_critical:g} it dominates it."
    )


def _describe_scale_high(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} ({value:.2f}×)" for name, value in _examples(hits))
    return (
        f"LoRA update scale may be suboptimal: in {_count(hits, records)} ‖ΔW‖F exceeds "
        f"{limits.update_scale_high:g}× the frozen weight's ‖W‖F: {parts}{_and_more(hits)}."
    )


def _describe_scale_low(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} ({value:.1e}×)" for name, value in _examples(hits))
    return (
        f"LoRA update scale may be suboptimal: after {limits.update_scale_low_after_steps} steps "
        f"{_count(hits, records)} still change their layer by less than {limits.update_scale_low:g} of "
        f"‖W‖F: {parts}{_and_more(hits)}."
    )


def _describe_early_collapse(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} (down {100 * value:.0f}% from its peak)" for name, value in _examples(hits))
    return (
        f"LoRA adapter collapsed during warmup: the effective rank of {_count(hits, records)} dropped by "
        f"more than {100 * limits.early_collapse_drop:.0f}% within the first {limits.early_collapse_steps} "
        f"steps: {parts}{_and_more(hits)}."
    )


def _describe_saturated(hits, records, limits, total) -> str:
    parts = ", ".join(f"{name} (effective rank {value:.2f})" for name, value in _examples(hits))
    return (
        f"LoRA adaptation has saturated: the effective rank of {_count(hits, records)} has not changed by "
        f"more than {100 * limits.saturation_tolerance:g}% over the last {limits.saturation_checks} checks: "
        f"{parts}{_and_more(hits)}."
    )


def _format(value: float) -> str:
    return "inf (rank-deficient)" if math.isinf(value) else f"{value:.3g}"


RULES: tuple[_Rule, ...] = (
    _Rule(
        "low_effective_rank",
        Severity.WARNING,
        _low_rank,
        _describe_low_rank,
        "Reduce the rank of these modules (e.g. `lora-monitor squeeze`), or adjust lora_alpha so that more "
        "directions are used.",
    ),
    _Rule(
        "ill_conditioned",
        Severity.WARNING,
        _ill_conditioned,
        _describe_ill_conditioned,
        "Reduce the learning rate (or add weight decay on the LoRA factors).",
    ),
    _Rule(
        "early_rank_collapse",
        Severity.WARNING,
        _early_collapse,
        _describe_early_collapse,
        "Try a different initialization (e.g. PiSSA/OLoRA), a lower lora_alpha or learning rate, or a longer "
        "warmup.",
    ),
    _Rule(
        "rank_saturated",
        Severity.INFO,
        _saturated,
        _describe_saturated,
        "Consider stopping: the task may be learned, or the adapter cannot use more directions.",
    ),
    _Rule(
        "adapter_dominance",
        Severity.CRITICAL,
        _dominance("dominance_critical", None),
        _describe_dominance,
        "Lower lora_alpha or the learning rate, or stop earlier: the adapter is overwriting what the base "
        "model knows.",
    ),
    _Rule(
        "adapter_dominance",
        Severity.WARNING,
        _dominance("dominance_warning", "dominance_critical"),
        _describe_dominance,
        "Watch the evaluation loss for forgetting; consider a lower lora_alpha or learning rate.",
    ),
    _Rule(
        "update_scale_too_large",
        Severity.WARNING,
        _scale_high,
        _describe_scale_high,
        "Lower lora_alpha (the update is scaled by alpha/r) or the learning rate.",
    ),
    _Rule(
        "update_scale_too_small",
        Severity.INFO,
        _scale_low,
        _describe_scale_low,
        "Raise lora_alpha or the learning rate, or remove these modules from target_modules.",
    ),
)


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
        if not hits:
            continue
        alerts.append(
            Alert(
                code=rule.code,
                severity=rule.severity,
                modules=tuple(name for name, _ in hits),
                message=rule.describe(hits, records, limits, len(records)),
                action=rule.action,
                step=step,
                values=dict(hits),
            )
        )
    return alerts


class AlertMonitor:
    """Raises each alert once per (rule, severity, module): :meth:`update` returns only what is new.

    An alert whose modules were all raised before is dropped; one with some new modules is re-issued for
    the new modules only. ``alerts`` holds everything raised so far, ``counts`` how many per code.
    """

    def __init__(self, thresholds: AlertThresholds | Mapping[str, Any] | None = None) -> None:
        self.thresholds = AlertThresholds.from_value(thresholds)
        self.alerts: list[Alert] = []
        self._raised: set[tuple[str, Severity, str]] = set()

    def update(
        self, metrics: Sequence[ModuleMetrics], history: MetricsHistory | None = None, step: int | None = None
    ) -> list[Alert]:
        new_alerts = []
        for alert in check_alerts(metrics, history, self.thresholds, step):
            fresh = [name for name in alert.modules if (alert.code, alert.severity, name) not in self._raised]
            if not fresh:
                continue
            if len(fresh) != len(alert.modules):
                alert = _restrict(alert, fresh, metrics, history, self.thresholds, step)
            self._raised.update((alert.code, alert.severity, name) for name in fresh)
            new_alerts.append(alert)
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


def _restrict(
    alert: Alert,
    names: Iterable[str],
    metrics: Sequence[ModuleMetrics],
    history: MetricsHistory | None,
    limits: AlertThresholds,
    step: int | None,
) -> Alert:
    """The same alert limited to ``names``, with its message rewritten for them."""
    keep = set(names)
    rule = next(r for r in RULES if r.code == alert.code and r.severity == alert.severity)
    hits = [(name, value) for name, value in alert.values.items() if name in keep]
    records = {record.name: record for record in metrics}
    return replace(
        alert,
        modules=tuple(name for name, _ in hits),
        message=rule.describe(hits, records, limits, len(records)),
        values=dict(hits),
    )
