"""The alert rules: what each one looks for (``_find``) and how it says so (``_describe``).

Each rule gets one check's :class:`~lora_monitor.monitor.metrics.ModuleMetrics`, the
:class:`~lora_monitor.monitor.history.MetricsHistory` where it needs one, the thresholds and the step, and
returns ``(module, value)`` hits; :data:`RULES` pairs it with its severity, message and action.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import and_more
from .history import MetricsHistory
from .metrics import ModuleMetrics
from .thresholds import AlertThresholds, Severity

_Hit = tuple[str, float]  # (module name, triggering value)


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    find: Callable[[Sequence[ModuleMetrics], MetricsHistory | None, AlertThresholds, int | None], list[_Hit]]
    describe: Callable[[list[_Hit], Mapping[str, ModuleMetrics], AlertThresholds, int | None], str]
    action: str


def _live(metrics: Sequence[ModuleMetrics]) -> list[ModuleMetrics]:
    return [record for record in metrics if not record.is_zero and not record.non_finite]


def _non_finite(metrics, history, limits, step) -> list[_Hit]:
    return [(m.name, math.nan) for m in metrics if m.non_finite]


def _non_finite_base(metrics, history, limits, step) -> list[_Hit]:
    return [(m.name, math.nan) for m in metrics if m.non_finite_base and not m.non_finite]


def _dead(metrics, history, limits, step) -> list[_Hit]:
    # A zero B after N steps, or factors bit-identical since the first check N steps ago: nothing trains.
    if step is None or step < limits.dead_adapter_steps:
        return []
    hits = []
    for m in metrics:
        if m.non_finite:
            continue
        unchanged = m.unchanged_since is not None and step - m.unchanged_since >= limits.dead_adapter_steps
        if m.is_zero or unchanged:
            hits.append((m.name, float(step if m.is_zero else step - m.unchanged_since)))
    return hits


def _half_restored(metrics, history, limits, step) -> list[_Hit]:
    # Training never zeroes a whole row of B exactly; only B's initialization does, and then every row.
    return [
        (m.name, m.zero_row_fraction_B)
        for m in metrics
        if not m.non_finite and not m.is_zero and 0.0 < m.zero_row_fraction_B < 1.0
    ]


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
        drop = history.early_peak_drop(m.name, limits.early_collapse_steps)
        if drop is not None and drop > limits.early_collapse_drop:
            hits.append((m.name, drop))
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
    return and_more(len(hits), limit)


def _count(hits: list[_Hit], records: Mapping[str, ModuleMetrics]) -> str:
    total = len(records)
    return f"{len(hits)} of {total} LoRA module{'s' if total != 1 else ''}"


def _describe_low_rank(hits, records, limits, step) -> str:
    parts = ", ".join(
        f"{name} uses {100 * value:.0f}% of rank {records[name].nominal_rank} "
        f"(effective rank {records[name].effective_rank:.1f})"
        for name, value in _examples(hits)
    )
    return (
        f"{_count(hits, records)} use less than {100 * limits.low_rank_fraction:.0f}% of their configured "
        f"rank: {parts}{_and_more(hits)}."
    )


def _describe_ill_conditioned(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} (κ = {_format(value)})" for name, value in _examples(hits))
    return (
        f"LoRA matrices are becoming ill-conditioned: {_count(hits, records)} have a factor A or B with a "
        f"condition number above {limits.max_condition_number:g}: {parts}{_and_more(hits)}."
    )


def _describe_dominance(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} (ρ = {value:.2f})" for name, value in _examples(hits))
    return (
        f"The adapter's update is large next to the frozen weight in {_count(hits, records)}: "
        f"σmax(ΔW)/σmax(W) is {parts}{_and_more(hits)}; above {limits.dominance_warning:g} the adapter "
        f"modifies the base significantly, above {limits.dominance_critical:g} it dominates it."
    )


def _describe_scale_high(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} ({value:.2f}×)" for name, value in _examples(hits))
    return (
        f"LoRA update scale may be suboptimal: in {_count(hits, records)} ‖ΔW‖F exceeds "
        f"{limits.update_scale_high:g}× the frozen weight's ‖W‖F: {parts}{_and_more(hits)}."
    )


def _describe_scale_low(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} ({value:.1e}×)" for name, value in _examples(hits))
    return (
        f"LoRA update scale may be suboptimal: after {limits.update_scale_low_after_steps} steps "
        f"{_count(hits, records)} still change their layer by less than {limits.update_scale_low:g} of "
        f"‖W‖F: {parts}{_and_more(hits)}."
    )


def _describe_early_collapse(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} (down {100 * value:.0f}% from its peak)" for name, value in _examples(hits))
    return (
        f"LoRA adapter collapsed during warmup: the effective rank of {_count(hits, records)} dropped by "
        f"more than {100 * limits.early_collapse_drop:.0f}% within the first {limits.early_collapse_steps} "
        f"steps: {parts}{_and_more(hits)}."
    )


def _describe_saturated(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} (effective rank {value:.2f})" for name, value in _examples(hits))
    return (
        f"LoRA adaptation has saturated: the effective rank of {_count(hits, records)} has not changed by "
        f"more than {100 * limits.saturation_tolerance:g}% over the last {limits.saturation_checks} checks: "
        f"{parts}{_and_more(hits)}."
    )


def _describe_non_finite(hits, records, limits, step) -> str:
    names = ", ".join(name for name, _ in _examples(hits))
    return (
        f"NaN or Inf in the LoRA factors at step {step} in {_count(hits, records)}: {names}{_and_more(hits)}; "
        "their metrics are recorded as NaN and training goes on."
    )


def _describe_non_finite_base(hits, records, limits, step) -> str:
    names = ", ".join(name for name, _ in _examples(hits))
    return (
        f"NaN or Inf in the frozen base weight of {_count(hits, records)}: {names}{_and_more(hits)}; their "
        "dominance and update scale are recorded as NaN, the rest is measured and training goes on."
    )


def _describe_half_restored(hits, records, limits, step) -> str:
    parts = ", ".join(f"{name} ({100 * value:.0f}% of its rows)" for name, value in _examples(hits))
    return (
        f"LoRA adapter looks half restored: at step {step} lora_B of {_count(hits, records)} has rows that are "
        f"exactly zero while its other rows are not: {parts}{_and_more(hits)}. Training never zeroes a whole "
        "row of B (only its initialization does, and then every row): this is what an adapter resumed from "
        "a checkpoint that holds one process's shard looks like (FSDP2 checkpoints saved from the main "
        "process only: accelerate PR #4206, axolotl issue #3772), with that fraction of the adapter gone."
    )


def _describe_dead(hits, records, limits, step) -> str:
    parts = []
    for name, _ in _examples(hits):
        record = records[name]
        state = (
            "B is still exactly zero" if record.is_zero else f"unchanged since step {record.unchanged_since}"
        )
        cause = record.frozen_reason or "requires_grad off, learning rate 0, or not in the optimizer?"
        parts.append(f"{name} ({state}; {cause})")
    return (
        f"LoRA adapter is not training: after {limits.dead_adapter_steps}+ steps (now step {step}) "
        f"{_count(hits, records)} have not moved: {', '.join(parts)}{_and_more(hits)}."
    )


def _format(value: float) -> str:
    return "inf (rank-deficient)" if math.isinf(value) else f"{value:.3g}"


RULES: tuple[Rule, ...] = (
    Rule(
        "non_finite",
        Severity.CRITICAL,
        _non_finite,
        _describe_non_finite,
        "Training has diverged in these modules: lower the learning rate, enable gradient clipping "
        "(max_grad_norm) or check the data and precision (fp16 overflow); resume from an earlier checkpoint.",
    ),
    Rule(
        "non_finite",
        Severity.CRITICAL,
        _non_finite_base,
        _describe_non_finite_base,
        "The base model is broken, not the adapter: reload it from a good checkpoint, and check its dtype and "
        "quantization (a NaN in a frozen weight reaches every forward pass and then the LoRA factors).",
    ),
    Rule(
        "half_restored_adapter",
        Severity.CRITICAL,
        _half_restored,
        _describe_half_restored,
        "Stop this run and resume from a checkpoint that holds the whole adapter: with FSDP2, save a full "
        "(gathered) state dict (an Accelerate with PR #4206), or check the checkpoint's "
        "adapter_model.safetensors for rows of zeros before resuming.",
    ),
    Rule(
        "dead_adapter",
        Severity.CRITICAL,
        _dead,
        _describe_dead,
        "Make the LoRA parameters trainable (requires_grad=True), give them a non-zero learning rate, and "
        "make sure they are in the optimizer's param groups (an optimizer built before get_peft_model "
        "misses them).",
    ),
    Rule(
        "low_effective_rank",
        Severity.WARNING,
        _low_rank,
        _describe_low_rank,
        "Reduce the rank of these modules (e.g. `lora-monitor squeeze`), or adjust lora_alpha so that more "
        "directions are used.",
    ),
    Rule(
        "ill_conditioned",
        Severity.WARNING,
        _ill_conditioned,
        _describe_ill_conditioned,
        "Reduce the learning rate (or add weight decay on the LoRA factors).",
    ),
    Rule(
        "early_rank_collapse",
        Severity.WARNING,
        _early_collapse,
        _describe_early_collapse,
        "Try a different initialization (e.g. PiSSA/OLoRA), a lower lora_alpha or learning rate, or a longer "
        "warmup.",
    ),
    Rule(
        "rank_saturated",
        Severity.INFO,
        _saturated,
        _describe_saturated,
        "Consider stopping: the task may be learned, or the adapter cannot use more directions.",
    ),
    Rule(
        "adapter_dominance",
        Severity.CRITICAL,
        _dominance("dominance_critical", None),
        _describe_dominance,
        "Lower lora_alpha or the learning rate, or stop earlier: the adapter is overwriting what the base "
        "model knows.",
    ),
    Rule(
        "adapter_dominance",
        Severity.WARNING,
        _dominance("dominance_warning", "dominance_critical"),
        _describe_dominance,
        "Watch the evaluation loss for forgetting; consider a lower lora_alpha or learning rate.",
    ),
    Rule(
        "update_scale_too_large",
        Severity.WARNING,
        _scale_high,
        _describe_scale_high,
        "Lower lora_alpha (the update is scaled by alpha/r) or the learning rate.",
    ),
    Rule(
        "update_scale_too_small",
        Severity.INFO,
        _scale_low,
        _describe_scale_low,
        "Raise lora_alpha or the learning rate, or remove these modules from target_modules.",
    ),
)
