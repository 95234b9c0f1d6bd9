"""The monitor's results as a table and summary keys, for a tabular sink such as a W&B table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._io import json_safe
from .metrics import ModuleMetrics

# One row per module: its place in the model, then its ranks, conditioning and scale.
MODULE_TABLE_COLUMNS: tuple[str, ...] = (
    *("name", "module_type", "block", "layer_index", "nominal_rank", "effective_rank", "rank_utilization"),
    *("effective_rank_A", "effective_rank_B", "stable_rank", "kappa_A", "kappa_B", "sigma_max", "frobenius"),
    *("dominance", "update_scale", "gradient_effective_rank"),
)


def module_table_rows(metrics: Iterable[ModuleMetrics]) -> list[list[Any]]:
    """One row of :data:`MODULE_TABLE_COLUMNS` per module, JSON-safe (NaN and Inf as None)."""
    return [json_safe([getattr(module, column) for column in MODULE_TABLE_COLUMNS]) for module in metrics]


def alert_summary(total: int, counts: Mapping[str, int]) -> dict[str, int]:
    """The run-summary keys of the alerts raised: ``lora/alerts/total`` and one ``lora/alerts/<code>/<severity>``
    per entry of ``counts`` (:attr:`Monitor.alert_counts`)."""
    return {"lora/alerts/total": total, **{f"lora/alerts/{key}": count for key, count in counts.items()}}


__all__ = ["MODULE_TABLE_COLUMNS", "alert_summary", "module_table_rows"]
