"""Post-Squeeze: how much of each LoRA delta a lower rank keeps, which rank to deploy, the compressed adapter.

- :mod:`.options`: :class:`SqueezeOptions`, the one validator of thresholds, ranks and compression choices;
- :mod:`.analysis`: the variance table and rank recommendations (:func:`analyze_adapter`);
- :mod:`.compress`: the compressed adapter folder (:func:`compress_adapter`);
- :mod:`.manifest`: the run manifest's ``"squeeze"`` entry.

The table itself is drawn by :mod:`lora_monitor.render.console` (re-exported here as :func:`print_analysis`).
"""

from ..render.console import print_analysis, squeeze_table, summary_lines
from .analysis import GroupRecommendation, ModuleSqueeze, SqueezeAnalysis, analyze_adapter
from .compress import CompressionResult, compress_adapter, gather_adapter
from .manifest import manifest_entry, write_squeeze_manifest
from .options import (
    DEFAULT_THRESHOLD,
    SqueezeOptions,
    default_target_ranks,
    validate_rank,
    validate_ranks,
    validate_threshold,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "CompressionResult",
    "GroupRecommendation",
    "ModuleSqueeze",
    "SqueezeAnalysis",
    "SqueezeOptions",
    "analyze_adapter",
    "compress_adapter",
    "default_target_ranks",
    "gather_adapter",
    "manifest_entry",
    "print_analysis",
    "squeeze_table",
    "summary_lines",
    "validate_rank",
    "validate_ranks",
    "validate_threshold",
    "write_squeeze_manifest",
]
