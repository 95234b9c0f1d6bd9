"""Everything Post-Squeeze does with a trained adapter, in one call: what ``PostSqueezeCallback`` runs at the
end of training (and any training loop can run): the variance table, the rank by function on held-out
batches, the compressed copy, the intruder dimensions and the manifest entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import find_lora_modules
from ..errors import LoraMonitorError
from ..monitor.intruders import IntruderDimensions, intruder_dimensions
from .analysis import SqueezeAnalysis, analyze_adapter
from .compress import CompressionResult, compress_adapter
from .held_out import DEFAULT_TOLERANCE, FunctionRecommendation, recommend_rank_by_function
from .manifest import manifest_entry, summary_scalars, write_squeeze_manifest
from .options import SqueezeOptions, validate_tolerance
from .rank_choice import compression_rank


@dataclass
class EndOfTraining:
    """What :func:`squeeze_trained_adapter` found and wrote; ``warnings`` holds what failed without stopping
    it (a compression with no rank to compress to)."""

    analysis: SqueezeAnalysis
    function: FunctionRecommendation | None = None
    compression: CompressionResult | None = None
    intruders: list[IntruderDimensions] | None = None
    warnings: list[str] = field(default_factory=list)

    def write_manifest(self, output_dir: str | Path) -> Path:
        """Write the ``squeeze`` entry (analysis, function, compression, intruders) into ``output_dir``."""
        entry = manifest_entry(self.analysis, self.compression, self.intruders)
        entry["recommendation_basis"] = self.recommendation_basis
        if self.function is not None:
            entry["function"] = self.function.to_dict()
        return write_squeeze_manifest(Path(output_dir), entry)

    @property
    def recommendation_basis(self) -> str:
        """``"held-out loss"`` when the rank by function was measured, else ``"energy (upper bound)"``."""
        return "held-out loss" if self.function is not None else "energy (upper bound)"

    def scalars(self) -> dict[str, float]:
        """The ``squeeze/*`` summary keys for loggers."""
        scalars = summary_scalars(self.analysis, self.intruders)
        if self.function is not None:
            scalars["squeeze/function_recommended_rank"] = self.function.recommended_rank
        return scalars


def squeeze_trained_adapter(
    model: Any,
    output_dir: str | Path,
    options: SqueezeOptions,
    *,
    adapter_name: str | None = None,
    compress_to: str | None = None,
    eval_batches: Callable[[], Iterable[dict[str, Any]]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    by_module_type: bool = False,
    intruders: bool = True,
    print_tables: bool | None = None,
    function_required: bool = True,
) -> EndOfTraining:
    """Analyse a trained adapter (a live model, or the gathered snapshot of an FSDP2 one); then
    :meth:`EndOfTraining.write_manifest` writes the ``squeeze`` manifest entry. Nothing is printed: draw the
    tables with :func:`lora_monitor.render.console.print_rank_advice` (``print_tables`` is deprecated and
    does nothing).

    ``eval_batches`` (called once) gives held-out batches for the rank by function; ``compress_to`` names
    the sub-folder of ``output_dir`` for the compressed copy, at the function's rank when it was measured,
    else the energy recommendation (or one rank per module with ``options.per_module``). Intruder
    dimensions and the rank by function need a live model. Raises :class:`LoraMonitorError` on bad input;
    with ``function_required=False`` (``PostSqueezeCallback(by_function="auto")``) held-out batches that cannot
    be measured leave a warning and the energy rank instead, so the table, compression and manifest are kept.
    """
    if print_tables is not None:
        warnings.warn(
            "squeeze_trained_adapter(print_tables=...) is deprecated and does nothing: it prints no more; print "
            "the result with lora_monitor.render.console.print_rank_advice(result.analysis, result.function)",
            DeprecationWarning,
            stacklevel=2,
        )
    tolerance = validate_tolerance(tolerance)  # up front, measured or not: the same values refused everywhere
    if compress_to is not None and not (isinstance(compress_to, str) and compress_to):
        raise LoraMonitorError(f"compress_to must be a sub-folder name, got {compress_to!r}")
    output_dir = Path(output_dir)
    live = isinstance(model, torch.nn.Module)
    result = EndOfTraining(
        analyze_adapter(
            model,
            min_variance_retention=options.min_variance_retention,
            candidate_ranks=options.candidate_ranks,
            adapter_name=adapter_name,
        )
    )
    if eval_batches is not None and live:
        try:
            result.function = recommend_rank_by_function(
                model,
                eval_batches(),
                ranks=options.candidate_ranks,
                tolerance=tolerance,
                adapter_name=adapter_name,
                min_variance_retention=options.min_variance_retention,
                by_module_type=by_module_type,
                analysis=result.analysis,  # the table above: analysed once
            )
        except Exception as error:  # held-out data that cannot be measured (no scored token, NaN, a collator
            if function_required:  # that gives no batches of tensors): fatal only when it was asked for
                raise
            result.warnings.append(f"rank by function not measured ({error}); the energy rank stands")
    if compress_to is not None:
        try:  # no recommendation is an error naming the closest rank; the analysis is still written
            rank = compression_rank(options, result.analysis, result.function)
            result.compression = compress_adapter(
                model,
                output_dir / compress_to,
                min_variance_retention=options.min_variance_retention,
                per_module=options.per_module,
                target_rank=rank,
                candidate_ranks=options.candidate_ranks,
                analysis=result.analysis,
                adapter_name=adapter_name,
                overwrite=True,  # a re-run into the same output_dir replaces its own compressed copy
            )
        except LoraMonitorError as error:
            result.warnings.append(f"nothing compressed: {error}")
    if intruders and live:
        modules = find_lora_modules(model, adapter_name)
        result.intruders = intruder_dimensions(modules, lambda module: module.base_weight())
    return result


__all__ = ["EndOfTraining", "squeeze_trained_adapter"]
