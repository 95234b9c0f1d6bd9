"""Post-Squeeze analysis: how much of each LoRA delta a lower rank keeps, and which rank to deploy.

Train at a high rank, then squeeze (LoRA-Squeeze, Vulić et al. 2026). For every LoRA pair the singular values
of ``ΔW = s·B@A`` come from the spectrum engine without forming ``ΔW``; the fraction of ``‖ΔW‖²_F`` that the
top ``k`` directions keep is the *variance retained* at rank ``k``:

    analysis = analyze_adapter("runs/final", min_variance_retention=0.95)
    analysis.recommended_rank            # smallest rank whose mean retention reaches 95%

The compressed adapter is :func:`~lora_monitor.post_squeeze.compress.compress_adapter`'s; the table is drawn by
:func:`lora_monitor.render.console.print_analysis`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .._deprecation import renamed_keywords
from .._io import json_safe
from ..adapters import LoraModule, OpenedAdapter, module_block, open_adapter
from ..errors import LoraMonitorError, check_device, some_of
from ..spectrum import energy_curve, lora_spectra, rank_for_energy, reaches, stable_rank
from .options import DEFAULT_THRESHOLD, SqueezeOptions, check_ranks_within, default_candidate_ranks

# Modules decomposed per call of the engine: large enough to batch the r×r work, small enough that only
# this many factor pairs are in memory at once.
CHUNK_SIZE = 32
# A progress bar appears from this many LoRA pairs on (a 7B model has ~200).
PROGRESS_MIN_MODULES = 64

# What the energy rank is worth without held-out data (bench/EVIDENCE.md): in four of the five settings
# measured it was 2-8x above the smallest rank that lost nothing on held-out data (2x only on text at
# lora_alpha = r), and in one 8x below it, so it is printed as a rough bound, never as the answer.
ENERGY_RANK_CAVEAT = (
    "an upper bound, not a checked rank, in four of the five settings measured (bench/EVIDENCE.md): the "
    "95%-energy rank was 2–8× the smallest rank that lost nothing on held-out data there, and 8× below it in "
    "the fifth (text at lora_alpha=16); give held-out data for a checked rank"
)

# Why no rank is recommended for an adapter whose every delta is zero: the energy table, the rank by function,
# the per-module ranks and the budgets all refuse it (nothing was learned, so no rank is better than another).
ALL_ZERO = "every LoRA delta is zero (an untrained adapter?), so there is no rank to recommend"


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

    @property
    def stable_rank(self) -> float:
        """``‖ΔW‖²_F / σ₁²``: how many directions of the update's size carry its mass (0 for a zero delta)."""
        return float(stable_rank(torch.tensor(self.singular_values, dtype=torch.float64)))

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
    taken over the ``num_modules`` modules whose delta is not zero (``zero_modules`` lists the others: a
    zero delta has nothing to retain and is not counted as 100%). ``weighted_variance`` weights each module
    by its ``‖ΔW‖²_F``, i.e. the fraction of the whole adapter's energy kept. ``recommended_rank`` is the
    smallest target rank whose mean retention reaches ``min_variance_retention`` (``None`` when every
    module is zero, or no target rank reaches the threshold: :meth:`why_no_recommendation` says which);
    ``recommended_rank_weighted`` the same on the weighted mean.
    """

    source: str
    source_rank: int
    min_variance_retention: float
    candidate_ranks: list[int]
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
    def num_modules(self) -> int:
        """LoRA modules analysed: those whose delta is not zero (the table is taken over them)."""
        return len(self.modules) - len(self.zero_modules)

    @property
    def target_ranks(self) -> list[int]:
        """Deprecated name of :attr:`candidate_ranks`."""
        warnings.warn(
            "SqueezeAnalysis.target_ranks is deprecated: use candidate_ranks",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.candidate_ranks

    @property
    def num_layers(self) -> int:
        """Deprecated name of :attr:`num_modules` (it always counted modules, not layers)."""
        warnings.warn(
            "SqueezeAnalysis.num_layers is deprecated: it counts modules; use num_modules",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.num_modules

    @property
    def mean_stable_rank(self) -> float:
        """The mean over the analysed modules of :attr:`ModuleSqueeze.stable_rank` (NaN when every delta is
        zero): a data-free reading of how many directions the adapter uses."""
        live = [module.stable_rank for module in self.modules if not module.is_zero]
        return sum(live) / len(live) if live else math.nan

    @property
    def stable_rank_estimate(self) -> int | None:
        """:attr:`mean_stable_rank` rounded up (None when every delta is zero): a data-free estimate, not a
        recommendation. Against the knee in ``bench/EVIDENCE.md`` (the smallest directly trained rank within
        the noise of the best) it gave 2 or 3 on every adapter measured: right on the two sentiment tasks
        (knees 2 and 4) and at ``lora_alpha=16`` (knee 2), 8× too low on the generation task (knee 16 over 3
        seeds) and 32× at ``lora_alpha=16`` there (knee 64)."""
        mean = self.mean_stable_rank
        return None if math.isnan(mean) else math.ceil(mean - 1e-9)

    def why_no_recommendation(self) -> str | None:
        """Why :attr:`recommended_rank` is None (every delta is zero, or no candidate rank reaches the
        threshold: then the best candidate and what it keeps), or None when there is a recommendation."""
        if self.recommended_rank is not None:
            return None
        if self.num_modules == 0:
            return ALL_ZERO
        best = max(self.candidate_ranks)
        return (
            f"no rank in {self.candidate_ranks} keeps {100 * self.min_variance_retention:g}% on average; "
            f"rank {best} keeps {100 * self.mean_variance[best]:.1f}%"
        )

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
            "num_modules": self.num_modules,
            "target_ranks": self.candidate_ranks,  # the manifest's key, unchanged (files keep their format)
            "recommended_rank": self.recommended_rank,
            "recommended_rank_weighted": self.recommended_rank_weighted,
            "mean_stable_rank": json_safe(self.mean_stable_rank),
            "stable_rank_estimate": self.stable_rank_estimate,
            "no_recommendation": self.why_no_recommendation(),
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
            for k in self.candidate_ranks
        ]


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
    names = some_of([module.name for module, _, _ in pairs])
    try:
        result = compute()
    except (torch.linalg.LinAlgError, RuntimeError) as error:
        for module, A, B in pairs:
            _check_finite(module, where, lora_A=A, lora_B=B)
        if isinstance(error, torch.linalg.LinAlgError):  # finite factors whose products overflow
            raise LoraMonitorError(
                f"{where}: the spectrum of {names} could not be computed (factors too large?)"
            ) from error
        raise
    if not finite(result):
        for module, A, B in pairs:
            _check_finite(module, where, lora_A=A, lora_B=B)
        raise LoraMonitorError(f"{where}: the spectrum of {names} is not finite (factors too large?)")
    return result


# --------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------


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
                    lora_spectra,
                    [B for *_, B in pairs],
                    [A for _, A, _ in pairs],
                    [m.scale for m in chunk],
                    of_factors=False,  # the table needs the deltas' values only
                ),
                lambda found: bool(torch.isfinite(found.delta).all()),
                pairs,
                adapter.description,
            ).delta.cpu()
            spectra.extend(row[: module.rank] for row, module in zip(result, chunk, strict=True))
            bar.update(len(chunk))
    return spectra


def _recommend(mean_variance: Mapping[int, float], threshold: float) -> int | None:
    """The smallest rank whose retention reaches ``threshold`` (the engine's rule, tolerance included)."""
    return next((rank for rank in sorted(mean_variance) if reaches(mean_variance[rank], threshold)), None)


def _group(members: list[ModuleSqueeze], ranks: list[int], threshold: float) -> GroupRecommendation:
    live = [m for m in members if not m.is_zero]
    mean = {k: (sum(m.retained[k] for m in live) / len(live) if live else math.nan) for k in ranks}
    return GroupRecommendation(len(members), mean, _recommend(mean, threshold))


@renamed_keywords(target_ranks="candidate_ranks")
def analyze_adapter(
    path_or_model: Any,
    *,
    min_variance_retention: float = DEFAULT_THRESHOLD,
    candidate_ranks: Sequence[int] | None = None,
    adapter_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> SqueezeAnalysis:
    """The variance table of an adapter (folder, ``SavedAdapter`` or live PEFT model) and its rank advice.

    The options are checked by :class:`~lora_monitor.post_squeeze.options.SqueezeOptions`. ``candidate_ranks`` defaults to the powers of two up to the largest rank, plus that rank. ``device`` runs
    the decomposition there (the factors are read on the CPU). ``progress`` forces the progress bar on or
    off; by default it shows for adapters of 64+ modules when stderr is a terminal.
    Raises :class:`LoraMonitorError` on a bad threshold or rank, a missing or corrupt adapter, and NaN/Inf
    in any factor (naming the module).
    """
    options = SqueezeOptions(min_variance_retention=min_variance_retention, candidate_ranks=candidate_ranks)
    device = check_device(device)
    adapter = open_adapter(path_or_model, adapter_name, with_state=False)
    return analyse(adapter, options, device, progress)


def analyse(
    adapter: OpenedAdapter,
    options: SqueezeOptions,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> SqueezeAnalysis:
    """:func:`analyze_adapter` on an adapter already opened, with options already checked."""
    threshold, candidate_ranks = options.min_variance_retention, options.candidate_ranks
    source_rank = max(module.rank for module in adapter.modules)
    check_ranks_within(candidate_ranks or (), source_rank, "target rank", adapter.description)
    spectra = _module_spectra(adapter, device, progress)
    ranks = list(candidate_ranks) if candidate_ranks else default_candidate_ranks(source_rank)
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
        candidate_ranks=ranks,
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
