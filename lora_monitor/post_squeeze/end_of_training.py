"""Everything Post-Squeeze does with a trained adapter, in one call: what ``PostSqueezeCallback`` runs at the
end of training (and any training loop can run): the variance table, the rank by function on held-out
batches, the compressed copy, the intruder dimensions and the manifest entry.

Around that call: :func:`check_candidate_ranks` and :func:`function_is_measured` (before training, against
the live adapter) and :func:`held_out_batches` (the held-out batches, from given batches or a dataloader).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import find_lora_modules, records_are_sharded, unwrap_model
from ..errors import LoraMonitorError
from ..monitor.intruders import IntruderDimensions, intruder_dimensions
from .analysis import SqueezeAnalysis, analyze_adapter
from .compress import CompressionResult, compress_adapter
from .held_out import DEFAULT_LOSS_RETENTION, FunctionRecommendation, recommend_rank_by_function
from .manifest import TABLE_COLUMNS, manifest_entry, summary_scalars, table_rows, write_squeeze_manifest
from .options import SqueezeOptions, validate_threshold, validate_tolerance
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

    def variance_table(self) -> tuple[tuple[str, ...], list[list[Any]]]:
        """The variance table as its column names and rows (what a W&B table or a CSV takes)."""
        return TABLE_COLUMNS, table_rows(self.analysis)

    def run_summary(self) -> dict[str, float]:
        """The ``squeeze/*`` run-summary keys of the analysis and the intruder dimensions (:meth:`scalars`
        adds the rank by function)."""
        return summary_scalars(self.analysis, self.intruders)

    def scalars(self) -> dict[str, float]:
        """The ``squeeze/*`` summary keys for loggers."""
        scalars = self.run_summary()
        if self.function is not None:
            scalars["squeeze/function_recommended_rank"] = self.function.recommended_rank
        return scalars


def check_candidate_ranks(model: Any, options: SqueezeOptions, adapter_name: str | None = None) -> None:
    """A :class:`LoraMonitorError` (after ``options.where``) when ``options.candidate_ranks`` holds a rank
    above the largest rank of the live ``model``'s adapter: a compressed adapter has at most the directions
    it was trained with. Meant for before training: a bad rank stops the run before its first step."""
    largest = max(module.rank for module in find_lora_modules(model, adapter_name))
    candidates = options.candidate_ranks or ()
    above = [rank for rank in candidates if rank > largest]
    if above:
        prefix = f"{options.where}: " if options.where else ""
        raise LoraMonitorError(
            f"{prefix}candidate_ranks {list(candidates)} holds "
            f"{', '.join(map(str, above))}, above the adapter's largest rank {largest}: a compressed "
            f"adapter has at most the directions it was trained with; give ranks up to {largest}"
        )


BY_FUNCTION_CHOICES = (True, False, "auto")


def check_by_function(by_function: Any, where: str) -> bool | str:
    """``by_function`` if it is True, False or ``"auto"``, else a :class:`LoraMonitorError` naming ``where``."""
    if by_function not in BY_FUNCTION_CHOICES or not isinstance(by_function, bool | str):
        raise LoraMonitorError(f"{where}: by_function must be True, False or 'auto', got {by_function!r}")
    return by_function


def function_is_measured(
    by_function: bool | str, has_held_out_data: bool, model: Any, adapter_name: str | None, where: str
) -> bool:
    """Whether the rank by function will be measured at the end of training, decided before it starts.

    ``True`` measures it and needs held-out data: without any, a :class:`LoraMonitorError` naming ``where``
    stops the run before its first step, not after its last. ``"auto"`` measures it when there is held-out
    data and the adapter is not sharded (FSDP2 holds each process's slice of the factors; the rank by function
    runs the whole live adapter). ``False`` never does.
    """
    if by_function is True and not has_held_out_data:
        raise LoraMonitorError(
            f"{where}(by_function=True) needs held-out data: give the Trainer an eval_dataset, or pass eval_batches"
        )
    if by_function != "auto":
        return by_function is True
    sharded = model is not None and records_are_sharded(find_lora_modules(unwrap_model(model), adapter_name))
    return has_held_out_data and not sharded


def held_out_labels(
    by_function: bool | str, loader: Iterable[Any] | None, where: str
) -> tuple[bool, str | None]:
    """Whether the rank by function can be measured on ``loader``, read from its first batch before the first
    step (it measures held-out loss: the batches need labels), and the warning to give when it cannot. Without
    labels ``by_function=True`` is a :class:`LoraMonitorError` naming ``where``; ``"auto"`` falls back to the
    energy rank. The global RNG is left as it was: starting a DataLoader draws its base seed from it, and
    every dropout mask of the training after this look would otherwise differ."""
    with torch.random.fork_rng(devices=[]):
        first = next(iter(loader), None) if loader is not None else None
    if isinstance(first, Mapping) and first.get("labels") is not None:
        return True, None
    problem = "gives no batch" if first is None else "gives batches without labels (its collator adds none)"
    message = (
        f"{where}: the held-out data (the Trainer's eval_dataset) {problem}, and the rank by function measures "
        "held-out loss"
    )
    if by_function is True:
        raise LoraMonitorError(f"{message}: give it labels, or pass by_function=False")
    return False, f"{message}: the energy rank is recommended instead"


def held_out_batches(
    eval_batches: list[Mapping[str, Any]] | None, dataloader: Callable[[], Iterable[Mapping[str, Any]]]
) -> Callable[[], list[Mapping[str, Any]]]:
    """What :func:`squeeze_trained_adapter` takes as ``eval_batches``: ``eval_batches`` when given, else every
    batch of the loader that ``dataloader()`` returns, in one pass. The loader is built only when the batches
    are asked for: once a live adapter's rank by function is measured, never for an FSDP2 snapshot."""
    return lambda: eval_batches or list(dataloader())


def squeeze_trained_adapter(
    model: Any,
    output_dir: str | Path,
    options: SqueezeOptions,
    *,
    adapter_name: str | None = None,
    compress_to: str | None = None,
    eval_batches: Callable[[], Iterable[dict[str, Any]]] | None = None,
    tolerance: float | None = None,
    min_loss_retention: float = DEFAULT_LOSS_RETENTION,
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
    min_loss_retention = validate_threshold(min_loss_retention, "min_loss_retention")
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
                min_loss_retention=min_loss_retention,
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


__all__ = ["EndOfTraining", "check_candidate_ranks", "held_out_batches", "squeeze_trained_adapter"]
