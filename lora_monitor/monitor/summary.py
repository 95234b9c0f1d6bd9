"""The whole adapter at one check: mean and worst of every metric, overall, per block and per layer.

Blocks are ``"attention"``, ``"mlp"`` and ``"other"`` (embeddings, ``lm_head``, classifiers), the one
grouping of :func:`lora_monitor.adapters.module_block`; :class:`AdapterSummary` holds them in ``by_block``
(``by_type`` elsewhere means the module type, ``q_proj``, ``v_proj``...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _io as serialization
from .metrics import ModuleMetrics

# Metrics summarized for the whole adapter, with the direction in which a value is worse.
LOWER_IS_WORSE = (
    "effective_rank",
    "effective_rank_A",
    "effective_rank_B",
    "rank_utilization",
    "stable_rank",
    "gradient_effective_rank",
)
HIGHER_IS_WORSE = ("kappa_A", "kappa_B", "sigma_max", "frobenius", "dominance", "update_scale")
SUMMARIZED_METRICS = LOWER_IS_WORSE + HIGHER_IS_WORSE
# The per-block scalars sent to loggers (all metrics per block are in AdapterSummary.by_block).
PER_BLOCK_SCALARS = ("effective_rank", "rank_utilization", "dominance")


@dataclass
class MetricSummary:
    """Mean (over modules where the metric is defined and finite) and worst value, with the worst module."""

    mean: float | None
    worst: float | None
    worst_module: str | None
    count: int


@dataclass
class GroupSummary:
    """Summaries of every metric over one group of modules (all, one block, one layer)."""

    num_modules: int
    num_zero: int
    metrics: dict[str, MetricSummary]
    num_non_finite: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_modules": self.num_modules,
            "num_zero": self.num_zero,
            "num_non_finite": self.num_non_finite,
            "metrics": {
                key: serialization.json_safe(serialization.plain_fields(value))
                for key, value in self.metrics.items()
            },
        }


@dataclass
class AdapterSummary:
    """The whole adapter: ``overall``, ``by_block`` (``"attention"``/``"mlp"``/``"other"``) and ``by_layer``."""

    overall: GroupSummary
    by_block: dict[str, GroupSummary]
    by_layer: dict[int, GroupSummary]

    def scalars(self, prefix: str = "lora/") -> dict[str, float]:
        """Flat scalars for a logger: ``{prefix}mean_<metric>`` and ``{prefix}min_/max_<metric>``
        (min for ranks, max for conditioning, magnitude and dominance), those of effective rank, rank
        utilization and dominance per block under ``{prefix}attention/``, ``{prefix}mlp/`` and
        ``{prefix}other/``, and module counts. Undefined and non-finite values (an infinite worst κ) are left out: loggers and
        strict JSON take finite numbers only; :meth:`to_dict` still holds them (``inf`` as null)."""
        scalars: dict[str, float] = {
            f"{prefix}num_modules": float(self.overall.num_modules),
            f"{prefix}num_zero_modules": float(self.overall.num_zero),
            f"{prefix}num_non_finite_modules": float(self.overall.num_non_finite),
        }
        scalars.update(_group_scalars(self.overall, prefix))
        for block, group in self.by_block.items():
            scalars.update(_group_scalars(group, f"{prefix}{block}/", PER_BLOCK_SCALARS))
        return scalars

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "by_block": {key: value.to_dict() for key, value in self.by_block.items()},
            "by_layer": {str(key): value.to_dict() for key, value in self.by_layer.items()},
        }


def _group_scalars(group: GroupSummary, prefix: str, only: Sequence[str] | None = None) -> dict[str, float]:
    scalars = {}
    for metric, summary in group.metrics.items():
        if only is not None and metric not in only:
            continue
        worst_word = "min" if metric in LOWER_IS_WORSE else "max"
        if summary.mean is not None and math.isfinite(summary.mean):
            scalars[f"{prefix}mean_{metric}"] = summary.mean
        if summary.worst is not None and math.isfinite(summary.worst):
            scalars[f"{prefix}{worst_word}_{metric}"] = summary.worst
    return scalars


def _summarize_metric(metrics: Sequence[ModuleMetrics], metric: str) -> MetricSummary:
    values = []
    for record in metrics:
        value = getattr(record, metric)
        if record.is_zero or record.non_finite or value is None or math.isnan(value):
            continue
        values.append((value, record.name))
    if not values:
        return MetricSummary(None, None, None, 0)
    finite = [value for value, _ in values if math.isfinite(value)]
    mean = sum(finite) / len(finite) if finite else None
    pick = min if metric in LOWER_IS_WORSE else max
    worst, worst_module = pick(values, key=lambda item: item[0])
    return MetricSummary(mean, worst, worst_module, len(values))


def _group(metrics: Sequence[ModuleMetrics]) -> GroupSummary:
    return GroupSummary(
        num_modules=len(metrics),
        num_zero=sum(record.is_zero for record in metrics),
        num_non_finite=sum(record.non_finite for record in metrics),
        metrics={metric: _summarize_metric(metrics, metric) for metric in SUMMARIZED_METRICS},
    )


def summarize(metrics: Sequence[ModuleMetrics]) -> AdapterSummary:
    """Mean and worst of every metric for the whole adapter, per block and per layer.

    Zero modules and undefined values are left out of means and worsts; the mean of a condition number
    is over the finite ones (the worst may be ``inf``).
    """
    by_block: dict[str, list[ModuleMetrics]] = {}
    by_layer: dict[int, list[ModuleMetrics]] = {}
    for record in metrics:
        by_block.setdefault(record.block, []).append(record)
        if record.layer_index is not None:
            by_layer.setdefault(record.layer_index, []).append(record)
    return AdapterSummary(
        overall=_group(metrics),
        by_block={key: _group(value) for key, value in sorted(by_block.items())},
        by_layer={key: _group(value) for key, value in sorted(by_layer.items())},
    )
