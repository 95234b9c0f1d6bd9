"""Changing the rank of live PEFT LoRA modules during training, and of the optimizer state that goes with them.

Two ways to shrink a module from rank ``r`` to ``k``:

``resize``
    ``lora_A``/``lora_B`` are replaced by new, smaller parameters holding the best rank-``k`` factors of
    ``B @ A`` (same dtype, device and ``requires_grad``). The new parameters take the old ones' places in the
    optimizer's param groups; Adam's first moments are carried by the same linear maps that made the new
    factors (``B_new = B @ map_B``, ``A_new = map_A @ A``), second moments by the element-wise squared maps,
    step counts kept (``optimizer_state="project"``), or the state is dropped (``"reset"``). ``module.r``,
    ``module.lora_alpha``, ``module.scaling`` and the PEFT config's ``rank_pattern``/``alpha_pattern`` are
    updated so that the scale ``s`` is exactly unchanged and ``save_pretrained`` writes an adapter that
    ``PeftModel.from_pretrained`` reloads with the new shapes.

``mask``
    Shapes never change (the only safe choice under DDP, FSDP and DeepSpeed, whose parameter set is fixed).
    The first ``k`` columns of ``B`` and rows of ``A`` hold the rank-``k`` factors, the rest is zero and
    held at zero: their gradients are zeroed by a hook, their optimizer moments are zeroed. The delta has
    rank ``k``. With :func:`install_rank_hooks`, ``state_dict()`` hands out the first ``k`` columns/rows
    only (and the config says rank ``k``), so every saved adapter has the reduced rank; loading such an
    adapter back into a full-shape model zero-pads it and restores the mask.

All decompositions come from :mod:`lora_monitor.spectrum`; this module only moves parameters around.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .._deprecation import renamed_keywords
from .._distributed import broadcast_from_main
from ..adapters import (
    REFERENCE_ADAPTER_NAMES,
    as_A_matrix,
    as_B_matrix,
    factor_parameters,
    find_lora_modules,
    is_sharded,
    kept_rank,
    live_factors,
    nominal_rank,
    set_kept_rank,
    write_whole,
)
from ..errors import LoraMonitorError
from ..spectrum import decomposition_dtype, lora_spectra, rank_for_energy, truncate_factors
from .hooks import bind_rank_hooks, ensure_gradient_mask, has_rank_hooks
from .optimizer import left_map, project_masked_state, right_map, swap_in_optimizer
from .options import check_squeeze_options
from .replace import (
    adapter_config,
    compact_config,
    install_factors,
    saved_rank_and_alpha,
    set_rank_keeping_scale,
    write_module_pattern,
)


@dataclass
class ResizeEvent:
    """What one rank change did to one module.

    ``name`` is the module path PEFT matches patterns against. ``retained_variance`` is the fraction of
    ``‖B@A‖²_F`` the new factors keep (NaN for a zero delta). In mask mode ``new_rank`` is the kept rank;
    the parameter shapes stay at the nominal rank until the adapter is saved.
    """

    name: str
    adapter_name: str
    old_rank: int
    new_rank: int
    retained_variance: float
    mode: str
    method: str
    optimizer_state: str


@dataclass
class _RankKFactors:
    """New rank-k factors and the maps that made them (float64 maps, r×k and k×r)."""

    B: torch.Tensor
    A: torch.Tensor
    map_B: torch.Tensor
    map_A: torch.Tensor
    retained: float


def _rank_k_factors(
    B: torch.Tensor,
    A: torch.Tensor,
    k: int,
    method: str,
    *,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> _RankKFactors:
    """Best (``qr``: exact) or approximate (``rsvd``) rank-``k`` factors of ``B@A`` with their maps, computed
    in the engine's :func:`~lora_monitor.spectrum.decomposition_dtype` of the factors."""
    truncated = truncate_factors(
        B,
        A,
        k,
        dtype=decomposition_dtype(B.dtype, A.dtype),
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
    )
    return _RankKFactors(
        truncated.B, truncated.A, truncated.map_B.double(), truncated.map_A.double(), truncated.retained
    )


def _mask_module(
    module: LoraLayer,
    adapter_name: str,
    factors: _RankKFactors,
    current: int,
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: str,
) -> None:
    """Write the rank-k factors into the leading directions, zero the rest, and mask their gradients.

    The new factors are built whole and written into place: under FSDP2 each process writes its own shard
    (every process computed the same factors from the same gathered ones).
    """
    B, A = factor_parameters(module, adapter_name)
    k = factors.A.shape[0]
    new_B = torch.zeros(B.shape, dtype=B.dtype, device=B.device)
    new_A = torch.zeros(A.shape, dtype=A.dtype, device=A.device)
    as_B_matrix(new_B)[:, :k] = factors.B.to(new_B)
    as_A_matrix(new_A)[:k] = factors.A.to(new_A)
    write_whole(B, new_B)
    write_whole(A, new_A)
    set_kept_rank(module, adapter_name, k)
    ensure_gradient_mask(module, adapter_name)
    project_masked_state(
        optimizer, [(B, False, factors.map_B), (A, True, factors.map_A)], current, k, optimizer_state
    )


def resize_lora_module(
    module: LoraLayer,
    adapter_name: str,
    new_rank: int,
    *,
    method: str = "qr",
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: str = "project",
    mode: str = "resize",
    name: str | None = None,
    peft_config: Any | None = None,
    rsvd_oversample: int = 10,
    rsvd_power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> ResizeEvent:
    """Shrink one LoRA module of a live PEFT model to ``new_rank``, keeping its scale exactly.

    ``method`` is ``"qr"`` (exact best rank-k factors) or ``"rsvd"`` (randomized SVD of the never-formed
    ``B@A``, with ``rsvd_oversample`` probes beyond k and ``rsvd_power_iters`` power iterations).
    ``optimizer`` (a torch optimizer, or Accelerate's wrapper) gets the new Parameters in place of the old
    ones, with their state mapped (``optimizer_state="project"``) or dropped (``"reset"``). ``mode`` is
    ``"resize"`` (new, smaller parameters) or ``"mask"`` (same shapes, dropped directions zeroed and held at
    zero). ``peft_config`` (the adapter's ``LoraConfig``) gets ``rank_pattern``/``alpha_pattern`` entries
    under ``name`` (the module path, as in :class:`~lora_monitor.adapters.LoraModule`).
    A ``new_rank`` at or above the current rank changes nothing.
    """
    check_squeeze_options(method=method, optimizer_state=optimizer_state, mode=mode)
    label = name or type(module).__name__
    if new_rank < 1:
        raise LoraMonitorError(f"module {label}: target rank must be at least 1, got {new_rank}")
    if adapter_name in REFERENCE_ADAPTER_NAMES:
        raise LoraMonitorError(f"module {label}: adapter {adapter_name!r} is a frozen reference; not resized")
    current = kept_rank(module, adapter_name)
    nominal = nominal_rank(module, adapter_name)
    if mode == "resize" and current != nominal:
        raise LoraMonitorError(
            f"module {label}: it is masked to rank {current} of {nominal}; use mode='mask' or compact_masks()"
        )
    if new_rank >= current:
        return ResizeEvent(label, adapter_name, current, current, 1.0, mode, method, optimizer_state)

    B_param, A_param = factor_parameters(module, adapter_name)
    if mode == "resize" and is_sharded(A_param):
        raise LoraMonitorError(
            f"module {label}: mode='resize' cannot run under FSDP (FSDP2 shards a fixed set of parameters, "
            "whose shapes cannot change); use mode='mask'"
        )
    B, A = live_factors(module, adapter_name)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise LoraMonitorError(f"module {label}: its LoRA factors hold NaN or Inf; cannot squeeze them")
    factors = _rank_k_factors(
        B,
        A,
        new_rank,
        method,
        oversample=rsvd_oversample,
        power_iters=rsvd_power_iters,
        generator=generator,
    )
    kept = factors.A.shape[0]
    if mode == "mask":
        _mask_module(module, adapter_name, factors, current, optimizer, optimizer_state)
        if not has_rank_hooks(module):
            # Without them a save would write the nominal shapes next to a config that says the kept rank.
            bind_rank_hooks(module, label, adapter_name, "mask", peft_config)
        if peft_config is not None and name is not None:
            write_module_pattern(peft_config, name, *saved_rank_and_alpha(module, adapter_name))
    else:
        new_B, new_A = install_factors(module, adapter_name, factors.B, factors.A)
        alpha = set_rank_keeping_scale(module, adapter_name, kept)
        if peft_config is not None and name is not None:
            write_module_pattern(peft_config, name, kept, alpha)
        squared_B, squared_A = factors.map_B**2, factors.map_A**2
        swap_in_optimizer(
            optimizer,
            [
                (B_param, new_B, right_map(factors.map_B), right_map(squared_B)),
                (A_param, new_A, left_map(factors.map_A), left_map(squared_A)),
            ],
            optimizer_state,
        )
    return ResizeEvent(label, adapter_name, current, kept, factors.retained, mode, method, optimizer_state)


@renamed_keywords(target_ranks="new_ranks")  # the old name, for a release
def squeeze_model(
    model: nn.Module,
    new_ranks: int | Mapping[str, int],
    *,
    adapter_name: str | None = None,
    method: str = "qr",
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: str = "project",
    mode: str = "resize",
    min_variance_retention: float | None = None,
    rsvd_oversample: int = 10,
    rsvd_power_iters: int = 2,
    seed: int = 0,
) -> list[ResizeEvent]:
    """Shrink every LoRA module of one adapter of a live model; returns one event per module changed.

    ``new_ranks`` is one rank for all modules or ``{module path: rank}`` (modules not named are left
    alone). With ``min_variance_retention`` (a fraction in (0, 1]) each module keeps instead the smallest
    rank that retains that fraction of its ``‖ΔW‖²_F``, never fewer than its target rank. Modules already at
    or below their target are left alone, so calling this again with the same targets changes nothing.
    TRL's frozen ``ref`` adapter is never touched. Same options as :func:`resize_lora_module`.

    Under torch.distributed (world size > 1) rank 0 decides the per-module target ranks and broadcasts
    them, so every process applies the same squeeze: every process must call this, as a collective.
    """
    check_squeeze_options(
        method=method,
        optimizer_state=optimizer_state,
        mode=mode,
        min_variance_retention=min_variance_retention,
    )
    records = find_lora_modules(model, adapter_name)
    config = adapter_config(model, records[0].adapter_name) if records else None
    targets: dict[str, int] = {}
    for record in records:
        if isinstance(new_ranks, Mapping):
            if record.name in new_ranks:
                targets[record.name] = int(new_ranks[record.name])
        else:
            targets[record.name] = int(new_ranks)
    if isinstance(new_ranks, Mapping):
        unknown = sorted(set(new_ranks) - {record.name for record in records})
        if unknown:
            raise LoraMonitorError(
                f"no LoRA module named {unknown[0]} in this model ({len(unknown)} unknown)"
            )
    chosen = [
        r for r in records if r.name in targets and kept_rank(r.module, r.adapter_name) > targets[r.name]
    ]
    if min_variance_retention is not None and chosen:
        live = [live_factors(r.module, r.adapter_name) for r in chosen]
        spectra = lora_spectra([B for B, _ in live], [A for _, A in live], of_factors=False).delta
        for record, spectrum in zip(chosen, spectra, strict=True):
            needed = rank_for_energy(spectrum, min_variance_retention)
            targets[record.name] = max(targets[record.name], needed)
    # Each process decides from its own copy of the factors, and a min_variance_retention threshold can
    # fall on either side of a rounding difference; a module squeezed to different ranks in different
    # processes would break DDP's identical parameters. So the main process decides for all.
    decided = broadcast_from_main({record.name: targets[record.name] for record in chosen})
    generator = torch.Generator(device="cpu").manual_seed(seed)
    events = []
    for record in records:
        if record.name not in decided:
            continue
        target = decided[record.name]
        if kept_rank(record.module, record.adapter_name) <= target:
            continue
        events.append(
            resize_lora_module(
                record.module,
                record.adapter_name,
                target,
                method=method,
                optimizer=optimizer,
                optimizer_state=optimizer_state,
                mode=mode,
                name=record.name,
                peft_config=config,
                rsvd_oversample=rsvd_oversample,
                rsvd_power_iters=rsvd_power_iters,
                generator=generator,
            )
        )
    # One r for the modules that share a rank (all of them, after a uniform squeeze), patterns for the rest.
    compact_config(config, records)
    return events


def current_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """``{module path: rank}`` of one adapter of a live model (mask mode: the kept rank)."""
    return {r.name: kept_rank(r.module, r.adapter_name) for r in find_lora_modules(model, adapter_name)}


def compact_masks(
    model: nn.Module, *, adapter_name: str | None = None, optimizer: torch.optim.Optimizer | None = None
) -> list[ResizeEvent]:
    """Turn masked modules into really smaller ones (exact: the dropped directions are zero already).

    For after training or a single process; not under DDP/FSDP/DeepSpeed while they still train.
    """
    events = []
    records = find_lora_modules(model, adapter_name)
    config = adapter_config(model, records[0].adapter_name) if records else None
    for record in records:
        module, adapter = record.module, record.adapter_name
        kept, nominal = kept_rank(module, adapter), nominal_rank(module, adapter)
        if kept == nominal:
            continue
        B_param, A_param = factor_parameters(module, adapter)
        B, A = live_factors(module, adapter)
        new_B, new_A = install_factors(module, adapter, B.clone(), A.clone())
        set_kept_rank(module, adapter, None)
        alpha = set_rank_keeping_scale(module, adapter, kept)
        if config is not None:
            write_module_pattern(config, record.name, kept, alpha)
        select_B = torch.eye(nominal, kept, dtype=torch.float64)
        swap_in_optimizer(
            optimizer,
            [
                (B_param, new_B, right_map(select_B), right_map(select_B)),
                (A_param, new_A, left_map(select_B.mT), left_map(select_B.mT)),
            ],
            "project",
        )
        events.append(ResizeEvent(record.name, adapter, nominal, kept, 1.0, "resize", "slice", "project"))
    compact_config(config, records)
    return events


def compact_after_training(
    model: nn.Module,
    mode: str,
    *,
    distributed: bool,
    adapter_name: str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[ResizeEvent]:
    """At the end of a run squeezed in ``mode``: a single process drops the masked directions for real
    (:func:`compact_masks`: a smaller model, the same function); a ``distributed`` run keeps its shapes
    (DDP, FSDP and DeepSpeed hold on to the parameter set), and a resize run has nothing masked. Returns the
    events of what was compacted (none when left alone)."""
    if mode != "mask" or distributed:
        return []
    return compact_masks(model, adapter_name=adapter_name, optimizer=optimizer)
