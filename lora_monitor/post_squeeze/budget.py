"""Per-module ranks under a parameter budget: the same size as a uniform rank, spent where it matters.

Two ways to spend a budget of ``Σ r_i·(m_i + n_i)`` LoRA parameters:

- by **energy** (:func:`budget_ranks_by_energy`): the ranks that keep the most of the whole adapter's
  ``Σ‖s·B@A‖²_F``. Each extra direction of module ``i`` adds ``σ²`` at a cost of ``m_i + n_i`` parameters;
  spectra descend, so taking the best gain per parameter first is optimal up to the last direction.
- by **sensitivity** (:func:`budget_ranks_by_sensitivity`): one rank per module type, the combination whose
  measured held-out loss increases (:func:`recommend_rank_by_function` with ``by_module_type=True``: each
  type truncated alone) sum to the least within the budget; found exactly over the candidate ranks.

Either gives ``module_ranks`` for :func:`compress_adapter`. Every module keeps at least rank 1 (PEFT needs
``r >= 1``) and at most its own rank.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..adapters import LoraModule, open_adapter
from ..errors import LoraMonitorError, check_number
from .analysis import ALL_ZERO, SqueezeAnalysis, analyze_adapter
from .held_out import FunctionRecommendation
from .options import validate_rank


@dataclass
class BudgetRanks:
    """Per-module ranks whose LoRA parameters fit ``budget``, and what they keep.

    ``parameters`` is what the ranks cost (``≤ budget``); ``retained`` the fraction of the whole adapter's
    ``Σ‖ΔW‖²_F`` they keep; ``type_ranks`` the rank of each module type (sensitivity only) and
    ``predicted_loss_increase`` the sum of the types' measured loss increases at those ranks.
    """

    method: str
    budget: int
    parameters: int
    module_ranks: dict[str, int]
    retained: float
    type_ranks: dict[str, int] = field(default_factory=dict)
    predicted_loss_increase: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "parameters": self.parameters,
            "retained": self.retained,
            "type_ranks": self.type_ranks,
            "predicted_loss_increase": self.predicted_loss_increase,
            "module_ranks": self.module_ranks,
        }


def parameters_per_rank(module: LoraModule) -> int:
    """LoRA parameters one rank of ``module`` costs: a row of ``A`` and a column of ``B`` (``m + n``)."""
    return (math.prod(module.A_shape) + math.prod(module.B_shape)) // module.rank


def uniform_budget(path_or_model: Any, rank: int, adapter_name: str | None = None) -> int:
    """The LoRA parameters of the adapter with every module at ``min(rank, its rank)``."""
    rank = validate_rank(rank, "rank")
    modules = open_adapter(path_or_model, adapter_name).modules
    return sum(min(rank, m.rank) * parameters_per_rank(m) for m in modules)


def _whole_budget(budget: Any) -> int:
    """``budget`` as an int when it is a whole number >= 1 (not NaN, not a string), else a
    :class:`LoraMonitorError`: checked before the adapter is opened."""
    return int(check_number(budget, "budget", low=1, whole=True, hint="LoRA parameters"))


def _check_budget(budget: int, modules: list[LoraModule]) -> None:
    floor = sum(parameters_per_rank(m) for m in modules)
    if budget < floor:
        raise LoraMonitorError(
            f"parameter budget {budget} is below {floor}, the cost of rank 1 on all {len(modules)} LoRA modules"
        )


def budget_ranks_by_energy(
    path_or_model: Any,
    budget: int,
    *,
    adapter_name: str | None = None,
    analysis: SqueezeAnalysis | None = None,
) -> BudgetRanks:
    """Per-module ranks within ``budget`` parameters that keep the most of the adapter's ``Σ‖ΔW‖²_F``
    (``analysis``: this adapter's :func:`analyze_adapter` result when you have one; its spectra are used)."""
    budget = _whole_budget(budget)
    adapter = open_adapter(path_or_model, adapter_name)
    modules = adapter.modules
    _check_budget(budget, modules)
    spectra = _spectra(path_or_model, adapter_name, analysis, modules)
    if not any(values and values[0] > 0 for values in spectra.values()):
        raise LoraMonitorError(f"{adapter.description}: {ALL_ZERO}; no ranks were chosen for the budget")
    cost = {m.name: parameters_per_rank(m) for m in modules}
    ranks = {m.name: 1 for m in modules}
    spent = sum(cost.values())
    # (−gain per parameter, name): the next direction of each module, best first.
    # Zero directions gain nothing and are never bought.
    frontier = [
        (-(spectra[m.name][1] ** 2) / cost[m.name], m.name)
        for m in modules
        if m.rank > 1 and spectra[m.name][1] > 0
    ]
    heapq.heapify(frontier)
    while frontier:
        _, name = heapq.heappop(frontier)
        if spent + cost[name] > budget:
            continue  # a cheaper module's next direction may still fit
        ranks[name] += 1
        spent += cost[name]
        if ranks[name] < len(spectra[name]) and spectra[name][ranks[name]] > 0:
            heapq.heappush(frontier, (-(spectra[name][ranks[name]] ** 2) / cost[name], name))
    return BudgetRanks("energy", budget, spent, ranks, _retained(spectra, ranks))


def budget_ranks_by_sensitivity(
    path_or_model: Any,
    function: FunctionRecommendation,
    budget: int,
    *,
    adapter_name: str | None = None,
    analysis: SqueezeAnalysis | None = None,
) -> BudgetRanks:
    """One rank per module type within ``budget`` parameters, minimising the summed held-out loss increase
    measured with each type truncated alone (``function`` from ``recommend_rank_by_function(...,
    by_module_type=True)`` on the same adapter)."""
    budget = _whole_budget(budget)
    if not function.type_evaluations:
        raise LoraMonitorError(
            "budget_ranks_by_sensitivity needs the loss of each module type truncated alone: run "
            "recommend_rank_by_function(..., by_module_type=True)"
        )
    modules = open_adapter(path_or_model, adapter_name).modules
    _check_budget(budget, modules)
    by_type: dict[str, list[LoraModule]] = {}
    for module in modules:
        by_type.setdefault(module.module_type, []).append(module)
    missing = sorted(set(by_type) - set(function.type_evaluations))
    if missing:
        raise LoraMonitorError(f"the function evaluations have no module type(s) {missing} of this adapter")
    if not math.isfinite(function.full_loss):
        raise LoraMonitorError(
            f"the function evaluations were measured from a {function.full_loss} loss of the uncompressed "
            "model: no ranks are chosen from it (recommend_rank_by_function refuses such data)"
        )
    # Pareto front over (parameters, summed loss increase) while adding one type at a time: exact, and
    # small (a few candidate ranks per type).
    front: list[tuple[int, float, dict[str, int]]] = [(0, 0.0, {})]
    for kind, members in sorted(by_type.items()):
        options = []
        for rank, evaluation in sorted(function.type_evaluations[kind].items()):
            price = sum(min(rank, m.rank) * parameters_per_rank(m) for m in members)
            # A rank whose truncated loss is NaN broke the model: it costs infinitely much.
            increase = evaluation.loss_increase if not math.isnan(evaluation.loss_increase) else math.inf
            options.append((price, increase, rank))
        merged = [
            (spent + price, loss + increase, {**choice, kind: rank})
            for spent, loss, choice in front
            for price, increase, rank in options
            if spent + price <= budget
        ]
        merged.sort(key=lambda item: (item[0], item[1]))
        front = []
        for item in merged:
            if not front or item[1] < front[-1][1]:
                front.append(item)
    if not front:
        raise LoraMonitorError(
            f"parameter budget {budget} is below the cost of the smallest candidate rank on every module type"
        )
    spent, loss, type_ranks = min(front, key=lambda item: (item[1], item[0]))
    if not math.isfinite(loss):
        raise LoraMonitorError(
            f"every combination of ranks within the parameter budget {budget} gives a NaN or Inf loss"
        )
    ranks = {m.name: min(type_ranks[m.module_type], m.rank) for m in modules}
    return BudgetRanks(
        "sensitivity",
        budget,
        spent,
        ranks,
        _retained(_spectra(path_or_model, adapter_name, analysis, modules), ranks),
        type_ranks,
        loss,
    )


def _spectra(
    path_or_model: Any,
    adapter_name: str | None,
    analysis: SqueezeAnalysis | None,
    modules: list[LoraModule],
) -> dict[str, list[float]]:
    """Each module's singular values: from ``analysis`` when given (no second decomposition), else analysed."""
    if analysis is None:
        analysis = analyze_adapter(path_or_model, adapter_name=adapter_name, progress=False)
    elif {m.name: m.rank for m in analysis.modules} != {m.name: m.rank for m in modules}:
        raise LoraMonitorError(
            f"the analysis given is of another adapter ({analysis.source}): its modules differ"
        )
    return {module.name: module.singular_values for module in analysis.modules}


def _retained(spectra: Mapping[str, list[float]], ranks: Mapping[str, int]) -> float:
    total = sum(value**2 for values in spectra.values() for value in values)
    kept = sum(value**2 for name, values in spectra.items() for value in values[: ranks[name]])
    return kept / total if total > 0 else math.nan
