"""Post-Squeeze: how much of each LoRA delta a lower rank keeps, which rank to deploy, the compressed adapter."""

from .analysis import (
    DEFAULT_THRESHOLD,
    CompressionResult,
    GroupRecommendation,
    ModuleSqueeze,
    SqueezeAnalysis,
    analyze_adapter,
    compress_adapter,
    default_target_ranks,
    print_analysis,
    squeeze_table,
    summary_lines,
    validate_rank,
    validate_threshold,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "CompressionResult",
    "GroupRecommendation",
    "ModuleSqueeze",
    "SqueezeAnalysis",
    "analyze_adapter",
    "compress_adapter",
    "default_target_ranks",
    "print_analysis",
    "squeeze_table",
    "summary_lines",
    "validate_rank",
    "validate_threshold",
]
