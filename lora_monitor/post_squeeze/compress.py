"""Post-Squeeze compression: a lower-rank copy of an adapter, written as an ordinary PEFT adapter folder.

    compress_adapter("runs/final", "runs/squeezed", target_rank=8)          # one rank for all
    compress_adapter("runs/final", "runs/squeezed", per_module=True)        # each module its own rank
    compress_adapter("runs/final", "runs/squeezed")                         # the recommended rank at 95%

Each module's new factors are its best rank-``k`` approximation with ``√S`` split between ``B`` and ``A``; its
scale ``s`` is kept exactly (``α·k/r``, or ``α·√(k/r)`` with rsLoRA, written as a float where it is not whole);
per-module ranks are written as ``rank_pattern``/``alpha_pattern`` keys anchored to one module each
(:func:`~lora_monitor.adapters.lora_config_for_ranks`). DoRA magnitudes, ``modules_to_save``, embedding and
conv LoRA, every other stored key and the stored dtype are kept. The folder is written by
:func:`~lora_monitor.adapters.write_adapter_folder` (a staging sibling renamed into place).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .._deprecation import renamed_keywords
from .._io import json_safe
from ..adapters import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraModule,
    OpenedAdapter,
    check_output,
    find_lora_modules,
    lora_config_for_ranks,
    open_adapter,
    records_are_sharded,
    unwrap_model,
    write_adapter_folder,
)
from ..errors import LoraMonitorError, check_device, some_of
from ..spectrum import decomposition_dtype, truncate_many
from .analysis import CHUNK_SIZE, SqueezeAnalysis, _check_finite, _decomposed, _progress, analyse
from .options import DEFAULT_THRESHOLD, SqueezeOptions, check_ranks_within, validate_rank
from .rank_choice import compression_ranks


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


def _plan(
    adapter: OpenedAdapter,
    options: SqueezeOptions,
    module_ranks: Mapping[str, int] | None,
    analysis: SqueezeAnalysis | None,
    device: str | torch.device | None,
    progress: bool | None,
) -> tuple[dict[str, int], SqueezeAnalysis | None]:
    """The new rank of every module, and the analysis it came from (None for a fixed ``target_rank`` when
    none was given): ``analysis`` when the caller has one, else analysed here, once."""
    if analysis is not None:
        _check_analysis_of(adapter, options, analysis)
    if module_ranks is not None:
        return _given_ranks(adapter, options, module_ranks), analysis
    if options.target_rank is not None:
        source_rank = max(m.rank for m in adapter.modules)
        check_ranks_within([options.target_rank], source_rank, "target_rank", adapter.description)
    elif analysis is None:
        analysis = analyse(adapter, options, device, progress)
    return compression_ranks(adapter.modules, options, analysis), analysis


def _check_analysis_of(adapter: OpenedAdapter, options: SqueezeOptions, analysis: SqueezeAnalysis) -> None:
    """A :class:`LoraMonitorError` unless ``analysis`` is of this adapter's modules, at these options."""
    if {m.name: m.rank for m in analysis.modules} != {m.name: m.rank for m in adapter.modules}:
        raise LoraMonitorError(
            f"{adapter.description}: the analysis given is of another adapter ({analysis.source}): its "
            "modules or ranks differ"
        )
    if options.min_variance_retention != analysis.min_variance_retention or (
        options.candidate_ranks is not None and list(options.candidate_ranks) != analysis.candidate_ranks
    ):
        raise LoraMonitorError(
            f"{adapter.description}: the analysis given was made at min_variance_retention "
            f"{analysis.min_variance_retention:g} and candidate_ranks {analysis.candidate_ranks}, not at "
            f"{options.min_variance_retention:g} and {list(options.candidate_ranks or analysis.candidate_ranks)}"
        )


def _given_ranks(
    adapter: OpenedAdapter, options: SqueezeOptions, module_ranks: Mapping[str, int]
) -> dict[str, int]:
    """``module_ranks`` checked against the adapter: every name one of its modules, every rank a whole number
    from 1 to the module's rank; modules not named keep their rank."""
    if options.target_rank is not None or options.per_module:
        raise LoraMonitorError("give module_ranks, target_rank or per_module, not more than one")
    ranks = {m.name: m.rank for m in adapter.modules}
    unknown = sorted(set(module_ranks) - set(ranks))
    if unknown:
        raise LoraMonitorError(f"{adapter.description}: module_ranks names no LoRA module {some_of(unknown)}")
    for name, rank in module_ranks.items():
        what = f"module_ranks[{name!r}]"
        rank = validate_rank(rank, what)
        if rank > ranks[name]:
            raise LoraMonitorError(
                f"{adapter.description}: {what} = {rank} is above the module's rank {ranks[name]}: a squeeze "
                "keeps or lowers a rank"
            )
        ranks[name] = rank
    return ranks


def gather_adapter(model: torch.nn.Module, adapter_name: str | None = None) -> Any:
    """What the main process should analyse and compress at the end of a run: under FSDP2 the whole adapter,
    gathered by every process (a collective: call it in every process, then let only the main one go on),
    as an :class:`~lora_monitor.adapters.OpenedAdapter`; otherwise the model itself (nothing gathered)."""
    model = unwrap_model(model)
    if records_are_sharded(find_lora_modules(model, adapter_name)):
        return open_adapter(model, adapter_name, with_state=True)
    return model


@renamed_keywords(target_ranks="candidate_ranks")
def compress_adapter(
    path_or_model: Any,
    output_path: str | os.PathLike,
    *,
    target_rank: int | None = None,
    min_variance_retention: float | None = None,
    per_module: bool = False,
    candidate_ranks: Sequence[int] | None = None,
    module_ranks: Mapping[str, int] | None = None,
    analysis: SqueezeAnalysis | None = None,
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
      (default 0.95) among ``candidate_ranks`` (default: powers of two up to the adapter's rank, and that rank);
      when no candidate reaches the threshold the error says which rank came closest and what it keeps.
    - ``module_ranks={name: k}``: the ranks you give, e.g. a :class:`~lora_monitor.post_squeeze.BudgetRanks`'s
      (modules not named keep their rank).

    The rank is chosen by :func:`~lora_monitor.post_squeeze.rank_choice.compression_rank`, the same rule as the
    command's and the end of training's. ``analysis``: an :func:`analyze_adapter` result of this adapter that
    you already have (printed, say), used instead of analysing again; its threshold and candidate ranks are
    the defaults then, and other ones given here are refused.

    A rank above the adapter's own (``target_rank``, ``candidate_ranks``; a module's own for ``module_ranks``)
    is refused: a squeeze keeps or lowers a rank.

    Modules already at or below their new rank are copied unchanged. Every module keeps its scale exactly;
    DoRA magnitudes, ``modules_to_save``, other stored keys and the stored dtype are kept. The folder is
    written to a temporary sibling and renamed into place; the input is never touched, ``output_path``
    may not be the input or inside it, and an existing non-empty ``output_path`` is replaced only with
    ``overwrite=True``. Raises :class:`LoraMonitorError` on bad input (nothing is written then).
    """
    if min_variance_retention is None:
        min_variance_retention = DEFAULT_THRESHOLD if analysis is None else analysis.min_variance_retention
    options = SqueezeOptions(
        min_variance_retention=min_variance_retention,
        candidate_ranks=candidate_ranks,
        target_rank=target_rank,
        per_module=per_module,
    )
    device = check_device(device)
    adapter = open_adapter(path_or_model, adapter_name, with_state=True)
    output = Path(output_path)
    check_output(output, adapter.folder, overwrite)
    ranks, analysis = _plan(adapter, options, module_ranks, analysis, device, progress)
    assert adapter.tensor is not None and adapter.config is not None

    tensors: dict[str, torch.Tensor] = {}
    retained: dict[str, float] = {}
    factor_keys: set[str] = set()
    with _progress(len(adapter.modules), "squeeze: compress", progress) as bar:
        for start in range(0, len(adapter.modules), CHUNK_SIZE):
            chunk = adapter.modules[start : start + CHUNK_SIZE]
            to_truncate = []
            for module in chunk:
                A_stored, B_stored = adapter.tensor(module.keys["A"]), adapter.tensor(module.keys["B"])
                factor_keys.update((module.keys["A"], module.keys["B"]))
                A, B = A_stored.reshape(module.rank, -1), B_stored.reshape(-1, module.rank)
                if ranks[module.name] >= module.rank:
                    _check_finite(module, adapter.description, lora_A=A, lora_B=B)  # copied: never decomposed
                    tensors[module.keys["A"]], tensors[module.keys["B"]] = A_stored, B_stored
                    retained[module.name] = 1.0 if bool((A != 0).any() and (B != 0).any()) else math.nan
                else:
                    to_truncate.append((module, A_stored, B_stored, A, B))
            _write_truncated(adapter.description, to_truncate, ranks, device, tensors, retained)
            bar.update(len(chunk))
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


def _write_truncated(
    where: str,
    modules: list[tuple[LoraModule, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    ranks: dict[str, int],
    device: str | torch.device | None,
    tensors: dict[str, torch.Tensor],
    retained: dict[str, float],
) -> None:
    """Truncate ``(module, A_stored, B_stored, A, B)`` pairs to their new ranks in one batched call per
    compute dtype, and put the new factors, in their stored shapes, dtypes and on the CPU, into ``tensors``."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, (_, A_stored, *_) in enumerate(modules):
        by_dtype.setdefault(decomposition_dtype(A_stored.dtype), []).append(index)
    for compute, indices in by_dtype.items():
        chosen = [modules[i] for i in indices]
        on = [device if device is not None else A.device for *_, A, _ in chosen]
        results = _decomposed(
            partial(
                truncate_many,
                [B.to(where_to) for (*_, B), where_to in zip(chosen, on, strict=True)],
                [A.to(where_to) for (*_, A, _), where_to in zip(chosen, on, strict=True)],
                [ranks[module.name] for module, *_ in chosen],
                dtype=compute,
            ),
            lambda found: all(bool(torch.isfinite(r.singular_values).all()) for r in found),
            [(module, A, B) for module, _, _, A, B in chosen],
            where,
        )
        for (module, A_stored, B_stored, _, _), truncated in zip(chosen, results, strict=True):
            new_rank = ranks[module.name]
            # conv: A is (r, in, kh, kw) and B (out, r, 1, 1); the rank is dim 0 of A and dim 1 of B
            tensors[module.keys["A"]] = truncated.A.reshape(new_rank, *A_stored.shape[1:]).cpu()
            tensors[module.keys["B"]] = truncated.B.reshape(
                B_stored.shape[0], new_rank, *B_stored.shape[2:]
            ).cpu()
            retained[module.name] = truncated.retained
