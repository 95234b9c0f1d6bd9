"""lora-monitor: see whether a LoRA adapter uses its rank, squeeze it while or after training.

The public API, one screen:

    Finding LoRA pairs     find_lora_modules(model), load_adapter(path)            -> LoraModule records
    The spectrum engine    factored_svd, lora_spectra, truncate_factors, truncate_many, randomized_svd, LinearOperator,
                           weight_singular_values, effective_rank, stable_rank, condition_number,
                           energy_curve, rank_for_energy, spectral_norm
    Health metrics         compute_module_metrics, summarize, MetricsHistory, BaseNormCache;
                           AlertMonitor, AlertThresholds, Alert, check_alerts
    Post-Squeeze           analyze_adapter -> SqueezeAnalysis, compress_adapter, write_adapter_folder
    In-Squeeze             squeeze_model, resize_lora_module, compact_masks, current_ranks
    Rank before training   spectral_analysis, allocate_ranks, probe_rank
    Spectral editing       spectral_edit
    Pictures               write_report
    Trainer callbacks      from lora_monitor.callbacks import (SpectralMonitorCallback,
                                                               InSqueezeCallback, PostSqueezeCallback)
    Errors                 LoraMonitorError (bad input, with a message naming the file or module)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._output import silence_import_noise

# Before PEFT is imported (by any room below, or by the user after us): see lora_monitor._output.
silence_import_noise()

# Where each public name lives. Importing lora_monitor itself is cheap: a room (and torch, PEFT and
# transformers behind it) is imported the first time one of its names is used, so that the command's
# --help and argument errors answer at once.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".adapters": (
        "LoraModule",
        "SavedAdapter",
        "find_lora_modules",
        "load_adapter",
        "lora_modules",
        "scale_for",
        "write_adapter_folder",
    ),
    ".allocation": ("RankAllocation", "RankProbe", "allocate_ranks", "probe_rank", "spectral_analysis"),
    ".edit": ("SpectralEditResult", "spectral_edit"),
    ".errors": ("LoraMonitorError",),
    ".in_squeeze": ("ResizeEvent", "compact_masks", "current_ranks", "resize_lora_module", "squeeze_model"),
    ".monitor": (
        "Alert",
        "AlertMonitor",
        "AlertThresholds",
        "BaseNormCache",
        "MetricsHistory",
        "ModuleMetrics",
        "Monitor",
        "Severity",
        "check_alerts",
        "compute_module_metrics",
        "summarize",
    ),
    ".render": ("write_report",),
    ".spectrum": (
        "LinearOperator",
        "LoraSpectra",
        "SVDResult",
        "TruncatedFactors",
        "condition_number",
        "effective_rank",
        "energy_curve",
        "factored_svd",
        "lora_spectra",
        "randomized_svd",
        "rank_for_energy",
        "spectral_norm",
        "stable_rank",
        "truncate_factors",
        "truncate_many",
        "weight_singular_values",
    ),
    ".post_squeeze": ("SqueezeAnalysis", "analyze_adapter", "compress_adapter", "recommend_rank_by_function"),
    ".monitor.check": ("Monitor",),
}
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .adapters import (
        LoraModule,
        SavedAdapter,
        find_lora_modules,
        load_adapter,
        lora_modules,
        scale_for,
        write_adapter_folder,
    )
    from .allocation import RankAllocation, RankProbe, allocate_ranks, probe_rank, spectral_analysis
    from .edit import SpectralEditResult, spectral_edit
    from .errors import LoraMonitorError
    from .in_squeeze import ResizeEvent, compact_masks, current_ranks, resize_lora_module, squeeze_model
    from .monitor import (
        Alert,
        AlertMonitor,
        AlertThresholds,
        BaseNormCache,
        MetricsHistory,
        ModuleMetrics,
        Severity,
        check_alerts,
        compute_module_metrics,
        summarize,
    )
    from .monitor.check import Monitor
    from .post_squeeze import SqueezeAnalysis, analyze_adapter, compress_adapter, recommend_rank_by_function
    from .render import write_report
    from .spectrum import (
        LinearOperator,
        LoraSpectra,
        SVDResult,
        TruncatedFactors,
        condition_number,
        effective_rank,
        energy_curve,
        factored_svd,
        lora_spectra,
        randomized_svd,
        rank_for_energy,
        spectral_norm,
        stable_rank,
        truncate_factors,
        truncate_many,
        weight_singular_values,
    )

__all__ = [
    "Alert",
    "AlertMonitor",
    "AlertThresholds",
    "BaseNormCache",
    "LinearOperator",
    "LoraModule",
    "LoraMonitorError",
    "LoraSpectra",
    "MetricsHistory",
    "ModuleMetrics",
    "Monitor",
    "RankAllocation",
    "RankProbe",
    "ResizeEvent",
    "SVDResult",
    "SavedAdapter",
    "Severity",
    "SpectralEditResult",
    "SqueezeAnalysis",
    "TruncatedFactors",
    "allocate_ranks",
    "analyze_adapter",
    "check_alerts",
    "compact_masks",
    "compress_adapter",
    "compute_module_metrics",
    "condition_number",
    "current_ranks",
    "effective_rank",
    "energy_curve",
    "factored_svd",
    "find_lora_modules",
    "load_adapter",
    "lora_modules",
    "lora_spectra",
    "probe_rank",
    "randomized_svd",
    "rank_for_energy",
    "recommend_rank_by_function",
    "resize_lora_module",
    "scale_for",
    "spectral_analysis",
    "spectral_edit",
    "spectral_norm",
    "squeeze_model",
    "stable_rank",
    "summarize",
    "truncate_factors",
    "truncate_many",
    "weight_singular_values",
    "write_adapter_folder",
    "write_report",
]
