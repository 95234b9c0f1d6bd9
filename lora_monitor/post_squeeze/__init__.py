"""Post-Squeeze: how much of each LoRA delta a lower rank keeps, which rank to deploy, the compressed adapter.

- :mod:`.options`: :class:`SqueezeOptions`, the one validator of thresholds, ranks and compression choices,
  and :func:`read_squeeze_toml` (the command's TOML ``[squeeze]`` table);
- :mod:`.analysis`: the variance table and rank recommendations (:func:`analyze_adapter`);
- :mod:`.held_out`: the rank whose held-out loss stays within a tolerance (:func:`recommend_rank_by_function`);
- :mod:`.budget`: per-module ranks under a parameter budget, by energy or by measured sensitivity
  (:func:`budget_ranks_by_energy`, :func:`budget_ranks_by_sensitivity`);
- :mod:`.rank_choice`: the one rule for the rank to compress at (:func:`compression_rank`);
- :mod:`.compress`: the compressed adapter folder (:func:`compress_adapter`);
- :mod:`.manifest`: the run manifest's ``"squeeze"`` entry;
- :mod:`.end_of_training`: all of the above on a trained adapter in one call (:func:`squeeze_trained_adapter`,
  what ``PostSqueezeCallback`` runs).

Everything here returns data and prints nothing: the command and ``PostSqueezeCallback`` draw the tables with
:mod:`lora_monitor.render.console` (``print_analysis``, ``print_function_recommendation``, ``print_rank_advice``).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Where each public name lives: a module (and the engine, torch, behind it) is imported the first time one
# of its names is read, so that the command validates its options (.options imports nothing) at once.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".analysis": ("GroupRecommendation", "ModuleSqueeze", "SqueezeAnalysis", "analyze_adapter"),
    ".budget": (
        "BudgetRanks",
        "budget_ranks_by_energy",
        "budget_ranks_by_sensitivity",
        "parameters_per_rank",
        "uniform_budget",
    ),
    ".compress": ("CompressionResult", "compress_adapter", "gather_adapter"),
    ".end_of_training": ("EndOfTraining", "squeeze_trained_adapter"),
    ".held_out": (
        "DEFAULT_TOLERANCE",
        "FunctionRecommendation",
        "RankEvaluation",
        "recommend_rank_by_function",
    ),
    ".manifest": ("manifest_entry", "write_squeeze_manifest"),
    ".rank_choice": ("compression_rank", "compression_ranks"),
    ".options": (
        "DEFAULT_THRESHOLD",
        "SqueezeOptions",
        "default_candidate_ranks",
        "read_squeeze_toml",
        "validate_rank",
        "validate_ranks",
        "validate_threshold",
        "validate_tolerance",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .analysis import GroupRecommendation, ModuleSqueeze, SqueezeAnalysis, analyze_adapter
    from .budget import (
        BudgetRanks,
        budget_ranks_by_energy,
        budget_ranks_by_sensitivity,
        parameters_per_rank,
        uniform_budget,
    )
    from .compress import CompressionResult, compress_adapter, gather_adapter
    from .end_of_training import EndOfTraining, squeeze_trained_adapter
    from .held_out import (
        DEFAULT_TOLERANCE,
        FunctionRecommendation,
        RankEvaluation,
        recommend_rank_by_function,
    )
    from .manifest import manifest_entry, write_squeeze_manifest
    from .options import (
        DEFAULT_THRESHOLD,
        SqueezeOptions,
        default_candidate_ranks,
        read_squeeze_toml,
        validate_rank,
        validate_ranks,
        validate_threshold,
        validate_tolerance,
    )
    from .rank_choice import compression_rank, compression_ranks

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOLERANCE",
    "BudgetRanks",
    "CompressionResult",
    "EndOfTraining",
    "FunctionRecommendation",
    "GroupRecommendation",
    "ModuleSqueeze",
    "RankEvaluation",
    "SqueezeAnalysis",
    "SqueezeOptions",
    "analyze_adapter",
    "budget_ranks_by_energy",
    "budget_ranks_by_sensitivity",
    "compress_adapter",
    "compression_rank",
    "compression_ranks",
    "default_candidate_ranks",
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
]
