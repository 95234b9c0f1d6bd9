"""Post-Squeeze: how much of each LoRA delta a lower rank keeps, which rank to deploy, and the compressed adapter.

Train at a high rank, then squeeze (LoRA-Squeeze, Vulić et al. 2026). For every LoRA pair the singular values
of ``ΔW = s·B@A`` come from the spectrum engine without forming ``ΔW``; the fraction of ``‖ΔW‖²_F`` that the
top ``k`` directions keep is the *variance retained* at rank ``k``:

    analysis = analyze_adapter("runs/final", min_variance_retention=0.95)
    analysis.recommended_rank            # smallest rank whose mean retention reaches 95%
    print_analysis(analysis)             # the table, the recommended row marked "<--"
    compress_adapter("runs/final", "runs/squeezed", target_rank=analysis.recommended_rank)

The compressed folder is an ordinary PEFT adapter (``PeftModel.from_pretrained`` loads it). Each module's
new factors are its best rank-``k`` approximation with ``√S`` split between ``B`` and ``A``; its scale
``s`` is kept exactly (``α·k/r``, or ``α·√(k/r)`` with rsLoRA, written as a float where it is not whole);
per-module ranks are written as ``rank_pattern``/``alpha_pattern`` keys anchored to one module each. DoRA
magnitudes, ``modules_to_save``, embedding and conv LoRA, every other stored key and the stored dtype are
kept. :func:`write_adapter_folder` is the writer (a temporary sibling folder renamed into place).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .._io import json_safe
from ..adapters import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraModule,
    OpenedAdapter,
    lora_config_for_ranks,
    module_block,
    open_adapter,
    write_adapter_folder,
)
from ..adapters.folder import check_output
from ..errors import LoraMonitorError
from ..spectrum import energy_curve, lora_spectra, rank_for_energy, truncate_factors

DEFAULT_THRESHOLD = 0.95
# Modules decomposed per call of the engine: large enough to batch the r×r work, small enough that only
# this many factor pairs are in memory at once.
CHUNK_SIZE = 32
# A progress bar appears from this many LoRA pairs on (a 7B model has ~200).
PROGRESS_MIN_MODULES = 64


# --------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModuleSqueeze:
    """One LoRA pair's spectrum and what each rank keeps of it.

    ``singular_values`` are those of ``s·B@A`` (descending, ``rank`` of them); ``energy`` is ``‖ΔW‖²_F``;
    ``retained[k]`` the fraction of it the top ``k`` directions keep (NaN for an all-zero delta);
    ``minimal_rank`` the smallest ``k`` (any integer) reaching the threshold, 0 for an all-zero delta.
    """

    name: str
    module_type: str
    layer_index: int | None
    kind: str
    rank: int
    scale: float
    singular_values: list[float]
    energy: float
    retained: dict[int, float]
    minimal_rank: int

    @property
    def is_zero(self) -> bool:
        return self.energy == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layer_index": self.layer_index,
            "kind": self.kind,
            "rank": self.rank,
            "scale": self.scale,
            "energy": self.energy,
            "minimal_rank": self.minimal_rank,
            "retained": {str(k): json_safe(v) for k, v in self.retained.items()},
            "singular_values": self.singular_values,
        }


@dataclass
class GroupRecommendation:
    """Retention and recommended rank over a group of modules (one module type, one layer, attention/MLP)."""

    num_modules: int
    mean_variance: dict[int, float]
    recommended_rank: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_modules": self.num_modules,
            "recommended_rank": self.recommended_rank,
            "mean_variance": {str(k): json_safe(v) for k, v in self.mean_variance.items()},
        }


@dataclass
class SqueezeAnalysis:
    """The variance table of one adapter and the ranks it recommends.

    ``mean_variance``/``min_variance``/``max_variance``/``weighted_variance`` are keyed by target rank and
    taken over the ``num_layers`` modules whose delta is not zero (``zero_modules`` lists the others: a
    zero delta has nothing to retain and is not counted as 100%). ``weighted_variance`` weights each module
    by its ``‖ΔW‖²_F``, i.e. the fraction of the whole adapter's energy kept. ``recommended_rank`` is the
    smallest target rank whose mean retention reaches ``min_variance_retention`` (``None`` when every
    module is zero); ``recommended_rank_weighted`` the same on the weighted mean.
    """

    source: str
    source_rank: int
    min_variance_retention: float
    target_ranks: list[int]
    mean_variance: dict[int, float]
    min_variance: dict[int, float]
    max_variance: dict[int, float]
    weighted_variance: dict[int, float]
    recommended_rank: int | None
    recommended_rank_weighted: int | None
    by_module_type: dict[str, GroupRecommendation]
    by_block: dict[str, GroupRecommendation]
    by_layer: dict[int | None, GroupRecommendation]
    modules: list[ModuleSqueeze] = field(repr=False)
    zero_modules: list[str]

    @property
    def num_layers(self) -> int:
        """LoRA modules analysed (those with a non-zero delta)."""
        return len(self.modules) - len(self.zero_modules)

    @property
    def singular_values(self) -> dict[str, list[float]]:
        """Singular values of every module's ``s·B@A``, by module name."""
        return {module.name: module.singular_values for module in self.modules}

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types (rank keys become strings, NaN becomes null)."""

        def by_rank(values: Mapping[int, float]) -> dict[str, float | None]:
            return {str(k): json_safe(v) for k, v in values.items()}

        return {
            "source": self.source,
            "source_rank": self.source_rank,
            "min_variance_retention": self.min_variance_retention,
            "num_layers": self.num_layers,
            "num_modules": len(self.modules),
            "target_ranks": self.target_ranks,
            "recommended_rank": self.recommended_rank,
            "recommended_rank_weighted": self.recommended_rank_weighted,
            "mean_variance": by_rank(self.mean_variance),
            "min_variance": by_rank(self.min_variance),
            "max_variance": by_rank(self.max_variance),
            "weighted_variance": by_rank(self.weighted_variance),
            "by_module_type": {name: group.to_dict() for name, group in self.by_module_type.items()},
            "by_block": {name: group.to_dict() for name, group in self.by_block.items()},
            "by_layer": {
                ("none" if index is None else str(index)): group.to_dict()
                for index, group in self.by_layer.items()
            },
            "zero_modules": self.zero_modules,
            "modules": [module.to_dict() for module in self.modules],
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per target rank: rank, mean/min/max/weighted retention, recommended (bool)."""
        return [
            {
                "rank": k,
                "mean_variance": self.mean_variance[k],
                "min_variance": self.min_variance[k],
                "max_variance": self.max_variance[k],
                "weighted_variance": self.weighted_variance[k],
                "recommended": k == self.recommended_rank,
            }
            for k in self.target_ranks
        ]


@dataclass
class CompressionResult:
    """What :func:`compress_adapter` wrote: the folder, each module's old and new rank, what it kept."""

    output_path: Path
    source_ranks: dict[str, int]
    ranks: dict[str, int]
    retained: dict[str, float]  # fraction of ‖ΔW‖²_F kept per module (NaN for a zero delta)
    config: dict[str, Any]
    analysis: SqueezeAnalysis | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_path": str(self.output_path),
            "ranks": self.ranks,
            "source_ranks": self.source_ranks,
            "retained": {name: json_safe(v) for name, v in self.retained.items()},
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "rank_pattern": self.config.get("rank_pattern"),
            "alpha_pattern": self.config.get("alpha_pattern"),
        }


def _check_finite(module: LoraModule, where: str, **tensors: torch.Tensor) -> None:
    for label, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraMonitorError(
                f"{where}: module {module.name} has {bad} NaN/Inf value(s) in {label}; "
                "the adapter is broken (diverged training?), nothing was analysed or written"
            )


def _decomposed(
    compute: Callable[[], Any],
    finite: Callable[[Any], bool],
    pairs: Sequence[tuple[LoraModule, torch.Tensor, torch.Tensor]],
    where: str,
) -> Any:
    """``compute()``, with NaN/Inf in the factors reported by module name.

    A NaN or Inf in a factor reaches its Gram matrix, where the eigensolver either refuses it or returns
    non-finite values; only then are the factors themselves scanned (a scan of every factor up front
    would cost as much again as the decomposition).
    """
    try:
        result = compute()
    except (torch.linalg.LinAlgError, RuntimeError):
        for module, A, B in pairs:
            _check_finite(module, where, lora_A=A, lora_B=B)
        raise
    if not finite(result):
        for module, A, B in pairs:
            _check_finite(module, where, lora_A=A, lora_B=B)
        names = ", ".join(module.name for module, _, _ in pairs)
        raise LoraMonitorError(f"{where}: the spectrum of {names} is not finite (factors too large?)")
    return result


# --------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------


def validate_threshold(threshold: float) -> float:
    """``threshold`` as a float if it is a fraction in (0, 1], else a :class:`LoraMonitorError`."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise LoraMonitorError(
            f"min_variance_retention must be a fraction in (0, 1] (0.95 = keep 95%), got {threshold!r}"
        )
    return float(threshold)


def validate_rank(rank: Any, what: str = "target_rank") -> int:
    """``rank`` if it is a whole number >= 1, else a :class:`LoraMonitorError` naming ``what``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraMonitorError(f"{what} must be a whole number >= 1, got {rank!r}")
    return rank


def default_target_ranks(source_rank: int) -> list[int]:
    """Powers of two up to ``source_rank``, and ``source_rank`` itself (1, 2, 4, ..., 64, 96 for r=96)."""
    ranks = [2**i for i in range(source_rank.bit_length()) if 2**i <= source_rank]
    return sorted({*ranks, source_rank})


def _progress(total: int, description: str, enabled: bool | None):
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal
    automatic = True if total < PROGRESS_MIN_MODULES else None
    disable = automatic if enabled is None else not enabled
    return tqdm(total=total, desc=description, unit="module", disable=disable, file=sys.stderr, leave=False)


def _module_spectra(
    adapter: OpenedAdapter, device: str | torch.device | None, progress: bool | None
) -> list[torch.Tensor]:
    """Singular values (float64, CPU, ``rank`` each) of every module's ``s·B@A``, in chunks of modules."""
    spectra: list[torch.Tensor] = []
    modules = adapter.modules
    with _progress(len(modules), "squeeze: spectra", progress) as bar:
        for start in range(0, len(modules), CHUNK_SIZE):
            chunk = modules[start : start + CHUNK_SIZE]
            pairs = [(module, module.A, module.B) for module in chunk]
            if device is not None:
                pairs = [(module, A.to(device), B.to(device)) for module, A, B in pairs]
            result = _decomposed(
                partial(
                    lora_spectra, [B for *_, B in pairs], [A for _, A, _ in pairs], [m.scale for m in chunk]
                ),
                lambda found: bool(torch.isfinite(found.delta).all()),
                pairs,
                adapter.description,
            ).delta.cpu()
            spectra.extend(row[: module.rank] for row, module in zip(result, chunk, strict=True))
            bar.update(len(chunk))
    return spectra


def _recommend(mean_variance: Mapping[int, float], threshold: float) -> int | None:
    # The same small tolerance as spectrum.rank_for_energy, so that 1.0 is reached despite rounding.
    for rank in sorted(mean_variance):
        value = mean_variance[rank]
        if not math.isnan(value) and value >= threshold - 1e-12:
            return rank
    return None


def _group(members: list[ModuleSqueeze], ranks: list[int], threshold: float) -> GroupRecommendation:
    live = [m for m in members if not m.is_zero]
    mean = {k: (sum(m.retained[k] for m in live) / len(live) if live else math.nan) for k in ranks}
    return GroupRecommendation(len(members), mean, _recommend(mean, threshold))


def analyze_adapter(
    path_or_model: Any,
    *,
    min_variance_retention: float = DEFAULT_THRESHOLD,
    target_ranks: Sequence[int] | None = None,
    adapter_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> SqueezeAnalysis:
    """The variance table of an adapter (folder, ``SavedAdapter`` or live PEFT model) and its rank advice.

    ``target_ranks`` defaults to the powers of two up to the largest rank, plus that rank. ``device`` runs
    the decomposition there (the factors are read on the CPU). ``progress`` forces the progress bar on or
    off; by default it shows for adapters of 64+ modules when stderr is a terminal.
    Raises :class:`LoraMonitorError` on a bad threshold or rank, a missing or corrupt adapter, and NaN/Inf
    in any factor (naming the module).
    """
    threshold = validate_threshold(min_variance_retention)
    if target_ranks is not None:
        target_ranks = [validate_rank(k, "every target rank") for k in target_ranks]
        if not target_ranks:
            raise LoraMonitorError("target_ranks is empty: give at least one rank, or None for the default")
    adapter = open_adapter(path_or_model, adapter_name, with_state=False)
    return _analyse(adapter, threshold, target_ranks, device, progress)


def _analyse(
    adapter: OpenedAdapter,
    threshold: float,
    target_ranks: Sequence[int] | None,
    device: str | torch.device | None,
    progress: bool | None,
) -> SqueezeAnalysis:
    spectra = _module_spectra(adapter, device, progress)
    source_rank = max(module.rank for module in adapter.modules)
    ranks = sorted(set(target_ranks)) if target_ranks else default_target_ranks(source_rank)
    records: list[ModuleSqueeze] = []
    for module, S in zip(adapter.modules, spectra, strict=True):
        curve = energy_curve(S)
        retained = {k: float(curve[min(k, module.rank) - 1]) for k in ranks}
        records.append(
            ModuleSqueeze(
                name=module.name,
                module_type=module.module_type,
                layer_index=module.layer_index,
                kind=module.kind,
                rank=module.rank,
                scale=module.scale,
                singular_values=S.tolist(),
                energy=float((S**2).sum()),
                retained=retained,
                minimal_rank=rank_for_energy(S, threshold),
            )
        )
    live = [record for record in records if not record.is_zero]

    def over_modules(reduce: Callable[[list[float]], float]) -> dict[int, float]:
        return {k: (reduce([m.retained[k] for m in live]) if live else math.nan) for k in ranks}

    mean = over_modules(lambda values: sum(values) / len(values))
    total_energy = sum(m.energy for m in live)
    weighted = {
        k: (sum(m.energy * m.retained[k] for m in live) / total_energy if live else math.nan) for k in ranks
    }
    by_type: dict[str, list[ModuleSqueeze]] = {}
    by_block: dict[str, list[ModuleSqueeze]] = {}
    by_layer: dict[int | None, list[ModuleSqueeze]] = {}
    for record in records:
        by_type.setdefault(record.module_type, []).append(record)
        by_block.setdefault(module_block(record.name), []).append(record)
        by_layer.setdefault(record.layer_index, []).append(record)
    return SqueezeAnalysis(
        source=adapter.description,
        source_rank=source_rank,
        min_variance_retention=threshold,
        target_ranks=ranks,
        mean_variance=mean,
        min_variance=over_modules(min),
        max_variance=over_modules(max),
        weighted_variance=weighted,
        recommended_rank=_recommend(mean, threshold),
        recommended_rank_weighted=_recommend(weighted, threshold),
        by_module_type={name: _group(group, ranks, threshold) for name, group in by_type.items()},
        by_block={name: _group(group, ranks, threshold) for name, group in by_block.items()},
        by_layer={index: _group(group, ranks, threshold) for index, group in by_layer.items()},
        modules=records,
        zero_modules=[record.name for record in records if record.is_zero],
    )


# --------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.2f}%"


def squeeze_table(analysis: SqueezeAnalysis):
    """The variance table as a ``rich.table.Table``; the recommended row is marked ``<--``."""
    from rich.table import Table

    table = Table(title=f"Post-Squeeze: {analysis.source}", title_justify="left")
    for column in ("Rank", "Mean Var%", "Min Var%", "Max Var%", "Weighted Var%"):
        table.add_column(column, justify="right")
    table.add_column("", justify="left")
    for row in analysis.rows():
        table.add_row(
            str(row["rank"]),
            _percent(row["mean_variance"]),
            _percent(row["min_variance"]),
            _percent(row["max_variance"]),
            _percent(row["weighted_variance"]),
            "<--" if row["recommended"] else "",
            style="bold green" if row["recommended"] else None,
        )
    return table


def summary_lines(analysis: SqueezeAnalysis) -> list[str]:
    """The sentences printed under the table: source rank, modules, recommendation, per-group advice."""
    percent = f"{100 * analysis.min_variance_retention:g}%"
    lines = [f"Source rank: {analysis.source_rank}    LoRA modules analysed: {analysis.num_layers}"]
    if analysis.zero_modules:
        lines.append(
            f"{len(analysis.zero_modules)} module(s) have an all-zero delta and are left out of the "
            f"table: {', '.join(analysis.zero_modules[:5])}{' ...' if len(analysis.zero_modules) > 5 else ''}"
        )
    if analysis.recommended_rank is None:
        lines.append("No recommendation: every LoRA delta is zero (an untrained adapter?)")
        return lines
    lines.append(f"Recommended rank: {analysis.recommended_rank} (mean >= {percent} variance retained)")
    lines.append(
        f"Energy-weighted: rank {analysis.recommended_rank_weighted} keeps >= {percent} of the whole "
        "adapter's ‖ΔW‖²"
    )
    blocks = [
        f"{group.recommended_rank} for {name}"
        for name, group in analysis.by_block.items()
        if group.recommended_rank is not None
    ]
    if len(blocks) > 1:
        lines.append("By block: rank " + ", ".join(blocks))
    types = [
        f"{name} {group.recommended_rank}"
        for name, group in analysis.by_module_type.items()
        if group.recommended_rank is not None
    ]
    lines.append("By module type: " + ", ".join(types))
    return lines


def print_analysis(analysis: SqueezeAnalysis, console: Any = None) -> None:
    """Print the variance table and the recommendation with rich (to stdout unless a Console is given)."""
    from rich.console import Console

    console = console or Console()
    console.print(squeeze_table(analysis))
    for line in summary_lines(analysis):
        console.print(line, highlight=False, markup=False)


# --------------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------------


def _plan(
    adapter: OpenedAdapter,
    target_rank: int | None,
    threshold: float | None,
    per_module: bool,
    device: str | torch.device | None,
    progress: bool | None,
) -> tuple[dict[str, int], SqueezeAnalysis | None]:
    if per_module and target_rank is not None:
        raise LoraMonitorError("give either target_rank (one rank for all) or per_module=True, not both")
    if target_rank is not None:
        validate_rank(target_rank)
        if threshold is not None:
            validate_threshold(threshold)
        return {m.name: min(target_rank, m.rank) for m in adapter.modules}, None
    threshold = validate_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)
    analysis = _analyse(adapter, threshold, None, device, progress)
    if per_module:
        # A zero delta keeps one (zero) direction: PEFT needs r >= 1.
        return {m.name: max(1, m.minimal_rank) for m in analysis.modules}, analysis
    if analysis.recommended_rank is None:
        raise LoraMonitorError(
            f"{adapter.description}: every LoRA delta is zero, so there is no rank to recommend; "
            "give target_rank to compress anyway"
        )
    return {m.name: min(analysis.recommended_rank, m.rank) for m in adapter.modules}, analysis


def compress_adapter(
    path_or_model: Any,
    output_path: str | os.PathLike,
    *,
    target_rank: int | None = None,
    min_variance_retention: float | None = None,
    per_module: bool = False,
    adapter_name: str | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> CompressionResult:
    """Write a lower-rank copy of an adapter (folder or live ``PeftModel``) as a PEFT adapter folder.

    - ``target_rank=k``: every module of rank above ``k`` gets its best rank-``k`` approximation.
    - ``per_module=True``: each module gets the smallest rank keeping ``min_variance_retention`` of its
      ``‖ΔW‖²_F`` (written as ``rank_pattern``/``alpha_pattern``).
    - neither: one rank for all, the analysis's ``recommended_rank`` at ``min_variance_retention``
      (default 0.95).

    Modules already at or below their new rank are copied unchanged. Every module keeps its scale exactly;
    DoRA magnitudes, ``modules_to_save``, other stored keys and the stored dtype are kept. The folder is
    written to a temporary sibling and renamed into place; the input is never touched, ``output_path``
    may not be the input or inside it, and an existing non-empty ``output_path`` is replaced only with
    ``overwrite=True``. Raises :class:`LoraMonitorError` on bad input (nothing is written then).
    """
    adapter = open_adapter(path_or_model, adapter_name, with_state=True)
    output = Path(output_path)
    check_output(output, adapter.folder, overwrite)
    ranks, analysis = _plan(adapter, target_rank, min_variance_retention, per_module, device, progress)
    assert adapter.tensor is not None and adapter.config is not None

    tensors: dict[str, torch.Tensor] = {}
    retained: dict[str, float] = {}
    factor_keys: set[str] = set()
    with _progress(len(adapter.modules), "squeeze: compress", progress) as bar:
        for module in adapter.modules:
            A_stored, B_stored = adapter.tensor(module.keys["A"]), adapter.tensor(module.keys["B"])
            factor_keys.update((module.keys["A"], module.keys["B"]))
            A, B = A_stored.reshape(module.rank, -1), B_stored.reshape(-1, module.rank)
            new_rank = ranks[module.name]
            if new_rank >= module.rank:
                _check_finite(module, adapter.description, lora_A=A, lora_B=B)  # copied: never decomposed
                tensors[module.keys["A"]], tensors[module.keys["B"]] = A_stored, B_stored
                retained[module.name] = 1.0 if bool((A != 0).any() and (B != 0).any()) else math.nan
            else:
                on = device if device is not None else A.device
                # float64: the float32 Gram route loses accuracy in directions far below σmax (its error
                # grows like eps·σmax/σk), and a written adapter should be as exact as the dense route.
                truncated = _decomposed(
                    partial(truncate_factors, B.to(on), A.to(on), new_rank, dtype=torch.float64),
                    lambda result: bool(torch.isfinite(result.singular_values).all()),
                    [(module, A, B)],
                    adapter.description,
                )
                # conv: A is (r, in, kh, kw) and B (out, r, 1, 1); the rank is dim 0 of A and dim 1 of B
                tensors[module.keys["A"]] = truncated.A.reshape(new_rank, *A_stored.shape[1:]).cpu()
                tensors[module.keys["B"]] = truncated.B.reshape(
                    B_stored.shape[0], new_rank, *B_stored.shape[2:]
                ).cpu()
                retained[module.name] = truncated.retained
            bar.update(1)
    for key in adapter.keys:
        if key not in factor_keys:
            tensors[key] = adapter.tensor(key)  # DoRA magnitudes, modules_to_save, lora bias, anything else

    config = lora_config_for_ranks(adapter.config, adapter.modules, ranks)
    extra_files = []
    if adapter.folder is not None:
        extra_files = [
            path
            for path in adapter.folder.iterdir()
            if path.is_file() and path.name not in {CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME}
        ]
    write_adapter_folder(
        output, config, tensors, extra_files=extra_files, source_folder=adapter.folder, overwrite=overwrite
    )
    return CompressionResult(
        output_path=output,
        source_ranks={m.name: m.rank for m in adapter.modules},
        ranks=ranks,
        retained=retained,
        config=config,
        analysis=analysis,
    )
