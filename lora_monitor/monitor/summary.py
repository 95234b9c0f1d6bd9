"""The whole adapter at one check: mean and worst of every metric, overall, per block and per layer.

Blocks are ``"attention"``, ``"mlp"`` and ``"other"`` (embeddings, ``lm_head``, classifiers), the one
grouping of :func:`lora_monitor.adapters.module_block`; :class:`AdapterSummary` holds them in ``by_block``
(``by_type`` elsewhere means the module type, ``q_proj``, ``v_proj``...).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _io
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

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        metrics = {key: _io.plain_fields(value) for key, value in self.metrics.items()}
        return {
            "num_modules": self.num_modules,
            "num_zero": self.num_zero,
            "num_non_finite": self.num_non_finite,
            "metrics": _io.json_safe(metrics) if json_safe else metrics,
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

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        """Strict-JSON ready (an infinite worst κ is null), unless ``json_safe=False``."""
        return {
            "overall": self.overall.to_dict(json_safe=json_safe),
            "by_block": {key: value.to_dict(json_safe=json_safe) for key, value in self.by_block.items()},
            "by_layer": {
                str(key): value.to_dict(json_safe=json_safe) for key, value in self.by_layer.items()
            },
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


# A module's values of every summarized metric, read in one call (a check summarizes each module three
# times, overall, in its block and in its layer: attribute reads per metric showed at every-step checks).
_METRIC_VALUES = operator.attrgetter(*SUMMARIZED_METRICS)
_LOWER_IS_WORSE = frozenset(LOWER_IS_WORSE)


def _summarize_column(column: Sequence[float | None], names: Sequence[str], metric: str) -> MetricSummary:
    """Mean (of the finite values) and worst of one metric's values over a group's modules (``names``, in
    the same order); undefined values (None, NaN) are left out, and the first of equal worsts is named."""
    # `value == value` is False for NaN only
    defined = [value for value in column if value is not None and value == value]
    if not defined:
        return MetricSummary(None, None, None, 0)
    worst = min(defined) if metric in _LOWER_IS_WORSE else max(defined)
    total = sum(defined)
    if math.isfinite(total):  # every value finite (the usual case): no second pass
        mean = total / len(defined)
    else:  # an infinite value (κ of a rank-deficient factor): the mean is of the finite ones
        finite = [value for value in defined if math.isfinite(value)]
        mean = sum(finite) / len(finite) if finite else None
    # index finds the worst object itself or an equal value before it: the first of equal worsts
    return MetricSummary(mean, worst, names[column.index(worst)], len(defined))


def _group(rows: Sequence[tuple[ModuleMetrics, tuple]]) -> GroupSummary:
    """The summary of one group from its ``(record, metric values)`` rows."""
    usable = [
        (record.name, values) for record, values in rows if not record.is_zero and not record.non_finite
    ]
    names = [name for name, _ in usable]
    columns = (
        zip(*(values for _, values in usable), strict=True) if usable else [()] * len(SUMMARIZED_METRICS)
    )
    return GroupSummary(
        num_modules=len(rows),
        num_zero=sum(record.is_zero for record, _ in rows),
        num_non_finite=sum(record.non_finite for record, _ in rows),
        metrics={
            metric: _summarize_column(column, names, metric)
            for metric, column in zip(SUMMARIZED_METRICS, columns, strict=True)
        },
    )


def summarize(metrics: Sequence[ModuleMetrics]) -> AdapterSummary:
    """Mean and worst of every metric for the whole adapter, per block and per layer.

    Zero modules and undefined values are left out of means and worsts; the mean of a condition number
    is over the finite ones (the worst may be ``inf``).
    """
    rows = [(record, _METRIC_VALUES(record)) for record in metrics]
    by_block: dict[str, list[tuple[ModuleMetrics, tuple]]] = {}
    by_layer: dict[int, list[tuple[ModuleMetrics, tuple]]] = {}
    for row in rows:
        by_block.setdefault(row[0].block, []).append(row)
        if row[0].layer_index is not None:
            by_layer.setdefault(row[0].layer_index, []).append(row)
    return AdapterSummary(
        overall=_group(rows),
        by_block={key: _group(value) for key, value in sorted(by_block.items())},
        by_layer={key: _group(value) for key, value in sorted(by_layer.items())},
    )
