"""Deprecated: Post-Squeeze lives in :mod:`lora_monitor.post_squeeze` now (beside ``in_squeeze``).

Every name this package had still works for one release, with a :class:`DeprecationWarning` naming its new
place (and its new name where it changed: ``allocate_by_energy`` is ``budget_ranks_by_energy``, ...).
"""

from .._lazy import lazy_exports

_NEW = "lora_monitor.post_squeeze"
_CONSOLE = "lora_monitor.render.console"
# old name -> "module:new name"
_RENAMED: dict[str, str] = {
    **{
        name: f"{_NEW}:{name}"
        for name in (
            "DEFAULT_THRESHOLD",
            "DEFAULT_TOLERANCE",
            "CompressionResult",
            "EndOfTraining",
            "FunctionRecommendation",
            "GroupRecommendation",
            "ModuleSqueeze",
            "RankEvaluation",
            "SqueezeAnalysis",
            "SqueezeOptions",
            "analyze_adapter",
            "compress_adapter",
            "gather_adapter",
            "manifest_entry",
            "parameters_per_rank",
            "read_squeeze_toml",
            "recommend_rank_by_function",
            "squeeze_trained_adapter",
            "uniform_budget",
            "validate_rank",
            "validate_ranks",
            "validate_threshold",
            "validate_tolerance",
            "write_squeeze_manifest",
        )
    },
    "BudgetAllocation": f"{_NEW}:BudgetRanks",
    "allocate_by_energy": f"{_NEW}:budget_ranks_by_energy",
    "allocate_by_sensitivity": f"{_NEW}:budget_ranks_by_sensitivity",
    "default_target_ranks": f"{_NEW}:default_candidate_ranks",
    "print_analysis": f"{_CONSOLE}:print_analysis",
    "squeeze_table": f"{_CONSOLE}:squeeze_table",
    "summary_lines": f"{_CONSOLE}:summary_lines",
}
__getattr__, __dir__ = lazy_exports(__name__, {}, _RENAMED)
__all__ = sorted(_RENAMED)
