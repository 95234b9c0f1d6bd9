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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..adapters import (
    KEPT_RANK_ATTRIBUTE,
    REFERENCE_ADAPTER_NAMES,
    LoraModule,
    find_lora_modules,
    pattern_key,
)
from ..errors import LoraMonitorError
from ..spectrum import lora_spectra, rank_for_energy, truncate_factors

METHODS = ("qr", "rsvd")
OPTIMIZER_STATES = ("project", "reset")
MODES = ("resize", "mask")

# Attributes lora-monitor keeps on a LoraLayer (plain dicts keyed by adapter name).
_KEPT_RANK = KEPT_RANK_ATTRIBUTE  # mask mode: how many leading directions are alive
_MASK_HOOKS = "lora_monitor_mask_hooks"
_BINDING = "lora_monitor_binding"


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
class _Factors:
    """New rank-k factors and the maps that made them (float64 maps, r×k and k×r)."""

    B: torch.Tensor
    A: torch.Tensor
    map_B: torch.Tensor
    map_A: torch.Tensor
    retained: float


# --------------------------------------------------------------------------------------------------------
# Reading and writing the factors of a live PEFT layer
# --------------------------------------------------------------------------------------------------------


def _kind(module: LoraLayer, adapter_name: str) -> str:
    if adapter_name in module.lora_A:
        return "conv" if module.lora_A[adapter_name].weight.dim() > 2 else "linear"
    if adapter_name in module.lora_embedding_A:
        return "embedding"
    raise LoraMonitorError(f"{type(module).__name__} has no LoRA adapter named {adapter_name!r}")


def _parameters(module: LoraLayer, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The live ``(B, A)`` Parameters in their stored shapes."""
    if _kind(module, adapter_name) == "embedding":
        return module.lora_embedding_B[adapter_name], module.lora_embedding_A[adapter_name]
    return module.lora_B[adapter_name].weight, module.lora_A[adapter_name].weight


def _as_B_matrix(tensor: torch.Tensor) -> torch.Tensor:
    # Linear B is out×r, conv B is out×r×1×1, embedding B is dim×r: always m×r after this.
    return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.dim() > 2 else tensor


def _as_A_matrix(tensor: torch.Tensor) -> torch.Tensor:
    # Linear A is r×n, conv A is r×in×kh×kw: r×(in·kh·kw).
    return tensor.reshape(tensor.shape[0], -1)


def _nominal_rank(module: LoraLayer, adapter_name: str) -> int:
    return int(_parameters(module, adapter_name)[1].shape[0])


def kept_rank(module: LoraLayer, adapter_name: str) -> int:
    """The rank a module's delta actually has room for: the mask's kept rank, else its parameter rank."""
    kept = getattr(module, _KEPT_RANK, {}).get(adapter_name)
    return int(kept) if kept is not None else _nominal_rank(module, adapter_name)


def _new_factor_module(old: nn.Module, weight: torch.Tensor, is_A: bool) -> nn.Module:
    """A copy of ``lora_A``/``lora_B`` (Linear or Conv) with a different rank, holding ``weight``."""
    rank = weight.shape[0] if is_A else weight.shape[1]
    factory = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(old, nn.Linear):
        new = (
            nn.Linear(old.in_features, rank, bias=False, **factory)
            if is_A
            else nn.Linear(rank, old.out_features, bias=old.bias is not None, **factory)
        )
    elif isinstance(old, nn.modules.conv._ConvNd):
        if old.groups != 1:
            raise LoraMonitorError(f"cannot resize a grouped LoRA convolution (groups={old.groups})")
        new = type(old)(
            old.in_channels if is_A else rank,
            rank if is_A else old.out_channels,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
            **factory,
        )
    else:
        raise LoraMonitorError(f"cannot resize a LoRA factor of type {type(old).__name__}")
    new.weight = nn.Parameter(weight, requires_grad=old.weight.requires_grad)
    if getattr(old, "bias", None) is not None:
        new.bias = old.bias  # the same Parameter object: the optimizer's reference stays valid
    new.train(old.training)
    return new


def _install_factors(
    module: LoraLayer, adapter_name: str, new_B: torch.Tensor, new_A: torch.Tensor
) -> tuple[nn.Parameter, nn.Parameter]:
    """Replace the adapter's factor parameters by new ones (given as matrices); returns the new ``(B, A)``."""
    old_B, old_A = _parameters(module, adapter_name)
    rank = new_A.shape[0]
    B_weight = new_B.reshape(old_B.shape[0], rank, *old_B.shape[2:]).to(old_B.dtype).contiguous()
    A_weight = new_A.reshape(rank, *old_A.shape[1:]).to(old_A.dtype).contiguous()
    if _kind(module, adapter_name) == "embedding":
        module.lora_embedding_B[adapter_name] = nn.Parameter(B_weight, requires_grad=old_B.requires_grad)
        module.lora_embedding_A[adapter_name] = nn.Parameter(A_weight, requires_grad=old_A.requires_grad)
    else:
        module.lora_B[adapter_name] = _new_factor_module(module.lora_B[adapter_name], B_weight, is_A=False)
        module.lora_A[adapter_name] = _new_factor_module(module.lora_A[adapter_name], A_weight, is_A=True)
    return _parameters(module, adapter_name)


def _set_rank_and_alpha(module: LoraLayer, adapter_name: str, new_rank: int) -> float:
    """Set ``r``, ``lora_alpha`` and ``scaling`` for a new rank, keeping the scale exactly; returns alpha."""
    old_rank = module.r[adapter_name]
    ratio = new_rank / old_rank
    use_rslora = bool(module.use_rslora.get(adapter_name, False))
    new_alpha = module.lora_alpha[adapter_name] * (math.sqrt(ratio) if use_rslora else ratio)
    module.r[adapter_name] = new_rank
    module.lora_alpha[adapter_name] = new_alpha
    # The scale is kept as it was, not recomputed from alpha/r, so that no rounding creeps in.
    return float(new_alpha)


# --------------------------------------------------------------------------------------------------------
# The PEFT config
# --------------------------------------------------------------------------------------------------------


def _peft_config(model: nn.Module, adapter_name: str) -> Any | None:
    model = getattr(model, "module", model)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping):
        return configs.get(adapter_name)
    return None


def _pattern_alpha(config: Any, name: str, rank: int, alpha: float) -> None:
    """Write ``rank_pattern``/``alpha_pattern`` entries for module ``name`` alone, matched first.

    The key is :func:`~lora_monitor.adapters.pattern_key` (an anchored, escaped full path), so it matches
    this one module under PEFT's ``get_pattern_key`` and never a module whose path merely ends the same
    way (``layers.1.q_proj`` vs ``layers.11.q_proj``).
    """
    key = pattern_key(name)
    for field_name, value in (("rank_pattern", int(rank)), ("alpha_pattern", float(alpha))):
        pattern = dict(getattr(config, field_name, None) or {})
        pattern.pop(key, None)
        # PEFT takes the first pattern key that matches, and a user's pattern (``q_proj``) may match this
        # module too: ours goes in front.
        setattr(config, field_name, {key: value, **pattern})


def saved_rank_and_alpha(module: LoraLayer, adapter_name: str) -> tuple[int, float]:
    """The ``(r, lora_alpha)`` an adapter saved now would carry for this module (mask mode: the kept rank)."""
    nominal = module.r[adapter_name]
    kept = kept_rank(module, adapter_name)
    alpha = module.lora_alpha[adapter_name]
    if kept != nominal:
        ratio = kept / nominal
        alpha = alpha * (math.sqrt(ratio) if module.use_rslora.get(adapter_name, False) else ratio)
    return kept, float(alpha)


# --------------------------------------------------------------------------------------------------------
# The decomposition (all of it in spectrum.py)
# --------------------------------------------------------------------------------------------------------


def _factor_working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when a factor is float64, float32 otherwise (bf16/fp16 factors are decomposed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rank_k_factors(
    B: torch.Tensor,
    A: torch.Tensor,
    k: int,
    method: str,
    *,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> _Factors:
    """Best (``qr``: exact) or approximate (``rsvd``) rank-``k`` factors of ``B@A`` with their maps."""
    truncated = truncate_factors(
        B,
        A,
        k,
        dtype=_factor_working_dtype(B, A),
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
    )
    return _Factors(
        truncated.B, truncated.A, truncated.map_B.double(), truncated.map_A.double(), truncated.retained
    )


# --------------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` behind Accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LoraMonitorError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def _is_second_moment(key: str) -> bool:
    # Adam's exp_avg_sq, AMSGrad's max_exp_avg_sq: averages of squared gradients map by the squared map.
    return "sq" in key


def _map_state(
    state: dict[str, Any], old: torch.Tensor, apply: Any, apply_squared: Any
) -> dict[str, Any] | None:
    """Carry one parameter's optimizer state through the factor maps; None when it cannot be carried."""
    mapped: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.numel() == 1:
            mapped[key] = value  # step counts and other scalars are kept
        elif value.shape == old.shape:
            mapped[key] = (apply_squared if _is_second_moment(key) else apply)(value)
        else:
            return None  # factored or otherwise shaped state (Adafactor...): it cannot be mapped
    return mapped


def _swap_in_optimizer(
    optimizer: torch.optim.Optimizer | None,
    swaps: list[tuple[nn.Parameter, nn.Parameter, Any, Any]],
    optimizer_state: str,
) -> None:
    """Put each new Parameter where its old one was in the param groups, with its state mapped or dropped."""
    if optimizer is None:
        return
    optimizer = unwrap_optimizer(optimizer)
    replacement = {id(old): (old, new, apply, apply_sq) for old, new, apply, apply_sq in swaps}
    for group in optimizer.param_groups:
        params = group["params"]
        for index, param in enumerate(params):
            entry = replacement.get(id(param))
            if entry is None:
                continue
            old, new, apply, apply_sq = entry
            params[index] = new
            state = optimizer.state.pop(old, None)
            if state and optimizer_state == "project":
                mapped = _map_state(state, old, apply, apply_sq)
                if mapped is not None:
                    optimizer.state[new] = mapped


def _right_map(matrix: torch.Tensor) -> Any:
    """``X ↦ X @ matrix`` for a B-shaped tensor (m×r, or out×r×1×1), in the tensor's dtype."""

    def apply(value: torch.Tensor) -> torch.Tensor:
        as_matrix = _as_B_matrix(value)
        out = as_matrix.to(torch.float64) @ matrix.to(value.device)
        return out.reshape(value.shape[0], matrix.shape[1], *value.shape[2:]).to(value.dtype).contiguous()

    return apply


def _left_map(matrix: torch.Tensor) -> Any:
    """``X ↦ matrix @ X`` for an A-shaped tensor (r×n, or r×in×kh×kw), in the tensor's dtype."""

    def apply(value: torch.Tensor) -> torch.Tensor:
        out = matrix.to(value.device) @ _as_A_matrix(value).to(torch.float64)
        return out.reshape(matrix.shape[0], *value.shape[1:]).to(value.dtype).contiguous()

    return apply


# --------------------------------------------------------------------------------------------------------
# Mask mode
# --------------------------------------------------------------------------------------------------------


def _zero_dropped(tensor: torch.Tensor, kept: int, is_A: bool) -> None:
    with torch.no_grad():
        if is_A:
            tensor[kept:] = 0
        else:
            tensor[:, kept:] = 0


def _ensure_mask_hooks(module: LoraLayer, adapter_name: str) -> None:
    """Gradient hooks that zero the dropped directions of both factors (read the kept rank on every call)."""
    hooks = getattr(module, _MASK_HOOKS, None)
    if hooks is None:
        hooks = {}
        setattr(module, _MASK_HOOKS, hooks)
    B, A = _parameters(module, adapter_name)
    if adapter_name in hooks and hooks[adapter_name][0] == (id(B), id(A)):
        return
    for handle in hooks.get(adapter_name, (None, []))[1]:
        handle.remove()

    def masked(is_A: bool) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            kept = kept_rank(module, adapter_name)
            if kept >= grad.shape[0 if is_A else 1]:
                return grad
            grad = grad.clone()
            _zero_dropped(grad, kept, is_A)
            return grad

        return hook

    handles = [B.register_hook(masked(False)), A.register_hook(masked(True))] if B.requires_grad else []
    hooks[adapter_name] = ((id(B), id(A)), handles)


def _mask_module(
    module: LoraLayer,
    adapter_name: str,
    factors: _Factors,
    current: int,
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: str,
) -> None:
    """Write the rank-k factors into the leading directions, zero the rest, and mask their gradients."""
    B, A = _parameters(module, adapter_name)
    k = factors.A.shape[0]
    with torch.no_grad():
        _as_B_matrix(B)[:, :k] = factors.B.to(B.dtype)
        _as_A_matrix(A)[:k] = factors.A.to(A.dtype)
        _zero_dropped(B, k, is_A=False)
        _zero_dropped(A, k, is_A=True)
    setattr(module, _KEPT_RANK, {**getattr(module, _KEPT_RANK, {}), adapter_name: k})
    _ensure_mask_hooks(module, adapter_name)
    if optimizer is None:
        return
    optimizer = unwrap_optimizer(optimizer)
    for param, is_A, matrix in ((B, False, factors.map_B), (A, True, factors.map_A)):
        state = optimizer.state.get(param)
        if not state:
            continue
        if optimizer_state == "reset":
            optimizer.state.pop(param)
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            used = matrix.abs() ** 2 if _is_second_moment(key) else matrix
            with torch.no_grad():
                if is_A:
                    block = _as_A_matrix(value)
                    block[:k] = (used.to(value.device) @ block[:current].double()).to(value.dtype)
                else:
                    block = _as_B_matrix(value)
                    block[:, :k] = (block[:, :current].double() @ used.to(value.device)).to(value.dtype)
                _zero_dropped(value, k, is_A)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


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
    if method not in METHODS:
        raise LoraMonitorError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer_state not in OPTIMIZER_STATES:
        raise LoraMonitorError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
    if mode not in MODES:
        raise LoraMonitorError(f"mode must be one of {MODES}, got {mode!r}")
    label = name or type(module).__name__
    if new_rank < 1:
        raise LoraMonitorError(f"module {label}: target rank must be at least 1, got {new_rank}")
    if adapter_name in REFERENCE_ADAPTER_NAMES:
        raise LoraMonitorError(f"module {label}: adapter {adapter_name!r} is a frozen reference; not resized")
    current = kept_rank(module, adapter_name)
    nominal = _nominal_rank(module, adapter_name)
    if mode == "resize" and current != nominal:
        raise LoraMonitorError(
            f"module {label}: it is masked to rank {current} of {nominal}; use mode='mask' or compact_masks()"
        )
    if new_rank >= current:
        return ResizeEvent(label, adapter_name, current, current, 1.0, mode, method, optimizer_state)

    B_param, A_param = _parameters(module, adapter_name)
    B = _as_B_matrix(B_param.detach())[:, :current]
    A = _as_A_matrix(A_param.detach())[:current]
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
        if getattr(module, _BINDING, None) is None:
            # Without it a save would write the nominal shapes next to a config that says the kept rank.
            _bind(module, _Binding(label, adapter_name, "mask", peft_config))
        if peft_config is not None and name is not None:
            _pattern_alpha(peft_config, name, *saved_rank_and_alpha(module, adapter_name))
    else:
        new_B, new_A = _install_factors(module, adapter_name, factors.B, factors.A)
        alpha = _set_rank_and_alpha(module, adapter_name, kept)
        if peft_config is not None and name is not None:
            _pattern_alpha(peft_config, name, kept, alpha)
        squared_B, squared_A = factors.map_B**2, factors.map_A**2
        _swap_in_optimizer(
            optimizer,
            [
                (B_param, new_B, _right_map(factors.map_B), _right_map(squared_B)),
                (A_param, new_A, _left_map(factors.map_A), _left_map(squared_A)),
            ],
            optimizer_state,
        )
    return ResizeEvent(label, adapter_name, current, kept, factors.retained, mode, method, optimizer_state)


def squeeze_model(
    model: nn.Module,
    target_ranks: int | Mapping[str, int],
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

    ``target_ranks`` is one rank for all modules or ``{module path: rank}`` (modules not named are left
    alone). With ``min_variance_retention`` (a fraction in (0, 1]) each module keeps instead the smallest
    rank that retains that fraction of its ``‖ΔW‖²_F``, never fewer than its target rank. Modules already at
    or below their target are left alone, so calling this again with the same targets changes nothing.
    TRL's frozen ``ref`` adapter is never touched. Same options as :func:`resize_lora_module`.

    Under torch.distributed (world size > 1) rank 0 decides the per-module target ranks and broadcasts
    them, so every process applies the same squeeze: every process must call this, as a collective.
    """
    if min_variance_retention is not None and not 0 < min_variance_retention <= 1:
        raise LoraMonitorError(f"min_variance_retention must be in (0, 1], got {min_variance_retention}")
    records = find_lora_modules(model, adapter_name)
    config = _peft_config(model, records[0].adapter_name) if records else None
    targets: dict[str, int] = {}
    for record in records:
        if isinstance(target_ranks, Mapping):
            if record.name in target_ranks:
                targets[record.name] = int(target_ranks[record.name])
        else:
            targets[record.name] = int(target_ranks)
    if isinstance(target_ranks, Mapping):
        unknown = sorted(set(target_ranks) - {record.name for record in records})
        if unknown:
            raise LoraMonitorError(
                f"no LoRA module named {unknown[0]} in this model ({len(unknown)} unknown)"
            )
    chosen = [
        r for r in records if r.name in targets and kept_rank(r.module, r.adapter_name) > targets[r.name]
    ]
    if min_variance_retention is not None and chosen:
        spectra = lora_spectra(
            [_live_matrices(r)[0] for r in chosen], [_live_matrices(r)[1] for r in chosen]
        ).delta
        for record, spectrum in zip(chosen, spectra, strict=True):
            needed = rank_for_energy(spectrum, min_variance_retention)
            targets[record.name] = max(targets[record.name], needed)
    decided = _same_decision_everywhere({record.name: targets[record.name] for record in chosen})
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
    return events


def _same_decision_everywhere(targets: dict[str, int]) -> dict[str, int]:
    """Rank 0's ``{module path: target rank}`` in every process of a torch.distributed run.

    Each process decides from its own copy of the factors, and a ``min_variance_retention`` threshold can
    fall on either side of a rounding difference; a module squeezed to different ranks in different
    processes would break DDP's identical parameters. So rank 0 decides for all (a collective: every
    process must call :func:`squeeze_model`).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return targets
    if torch.distributed.get_world_size() <= 1:
        return targets
    message = [targets if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(message, src=0)
    return dict(message[0])


def _live_matrices(record: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    kept = kept_rank(record.module, record.adapter_name)
    B_param, A_param = _parameters(record.module, record.adapter_name)
    return _as_B_matrix(B_param.detach())[:, :kept], _as_A_matrix(A_param.detach())[:kept]


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
    config = _peft_config(model, records[0].adapter_name) if records else None
    for record in records:
        module, adapter = record.module, record.adapter_name
        kept, nominal = kept_rank(module, adapter), _nominal_rank(module, adapter)
        if kept == nominal:
            continue
        B_param, A_param = _parameters(module, adapter)
        B, A = _as_B_matrix(B_param.detach()), _as_A_matrix(A_param.detach())
        new_B, new_A = _install_factors(module, adapter, B[:, :kept].clone(), A[:kept].clone())
        getattr(module, _KEPT_RANK).pop(adapter)
        alpha = _set_rank_and_alpha(module, adapter, kept)
        if config is not None:
            _pattern_alpha(config, record.name, kept, alpha)
        select_B = torch.eye(nominal, kept, dtype=torch.float64)
        _swap_in_optimizer(
            optimizer,
            [
                (B_param, new_B, _right_map(select_B), _right_map(select_B)),
                (A_param, new_A, _left_map(select_B.mT), _left_map(select_B.mT)),
            ],
            "project",
        )
        events.append(ResizeEvent(record.name, adapter, nominal, kept, 1.0, "resize", "slice", "project"))
    return events


# --------------------------------------------------------------------------------------------------------
# Saving and loading at the reduced rank (checkpoints, resume)
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Binding:
    name: str
    adapter_name: str
    mode: str
    config: Any | None


def _factor_keys(module: LoraLayer, adapter_name: str, prefix: str) -> tuple[str, str]:
    if _kind(module, adapter_name) == "embedding":
        return f"{prefix}lora_embedding_B.{adapter_name}", f"{prefix}lora_embedding_A.{adapter_name}"
    return f"{prefix}lora_B.{adapter_name}.weight", f"{prefix}lora_A.{adapter_name}.weight"


def _state_dict_post_hook(module: LoraLayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # Mask mode: hand out only the kept directions, so that every saved adapter has the reduced rank.
    binding: _Binding | None = getattr(module, _BINDING, None)
    if binding is None or _kind(module, binding.adapter_name) is None:
        return
    kept = kept_rank(module, binding.adapter_name)
    if kept == _nominal_rank(module, binding.adapter_name):
        return
    key_B, key_A = _factor_keys(module, binding.adapter_name, prefix)
    if key_B in state_dict:
        state_dict[key_B] = state_dict[key_B][:, :kept].clone()
    if key_A in state_dict:
        state_dict[key_A] = state_dict[key_A][:kept].clone()


def _load_pre_hook(
    module: LoraLayer,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    # An adapter saved after a squeeze has smaller factors than a freshly built model: make room for them.
    binding: _Binding | None = getattr(module, _BINDING, None)
    if binding is None:
        return
    adapter = binding.adapter_name
    key_B, key_A = _factor_keys(module, adapter, prefix)
    if key_A not in state_dict or key_B not in state_dict:
        return
    incoming = int(state_dict[key_A].shape[0])
    nominal = _nominal_rank(module, adapter)
    if binding.mode == "mask":
        if incoming > nominal:
            return  # let PyTorch report the size mismatch
        B_param, A_param = _parameters(module, adapter)
        padded_B = torch.zeros(B_param.shape, dtype=state_dict[key_B].dtype)
        padded_A = torch.zeros(A_param.shape, dtype=state_dict[key_A].dtype)
        padded_B[:, :incoming] = state_dict[key_B]
        padded_A[:incoming] = state_dict[key_A]
        state_dict[key_B], state_dict[key_A] = padded_B, padded_A
        kept = getattr(module, _KEPT_RANK, {})
        kept.pop(adapter, None)
        if incoming < nominal:
            kept[adapter] = incoming
            _ensure_mask_hooks(module, adapter)
        setattr(module, _KEPT_RANK, kept)
    elif incoming != nominal:
        B_param, A_param = _parameters(module, adapter)
        new_B = torch.zeros(
            _as_B_matrix(B_param).shape[0], incoming, dtype=B_param.dtype, device=B_param.device
        )
        new_A = torch.zeros(
            incoming, _as_A_matrix(A_param).shape[1], dtype=A_param.dtype, device=A_param.device
        )
        _install_factors(module, adapter, new_B, new_A)
        _set_rank_and_alpha(module, adapter, incoming)
    if binding.config is not None:
        _pattern_alpha(binding.config, binding.name, *saved_rank_and_alpha(module, adapter))


def install_rank_hooks(model: nn.Module, *, adapter_name: str | None = None, mode: str = "resize") -> int:
    """Make a live model save and load one adapter at its squeezed ranks; returns the modules hooked.

    After this, ``state_dict()`` (and so ``save_pretrained`` and every Trainer checkpoint) holds masked
    modules at their kept rank, and loading a state dict or checkpoint whose factors have a smaller rank
    than the live ones first makes room: ``mode="resize"`` gives the module new parameters of the incoming
    rank (scale kept); ``mode="mask"`` zero-pads the incoming factors and masks the extra directions. That
    is what lets ``Trainer.train(resume_from_checkpoint=...)`` resume a run saved after a squeeze on a
    freshly built model. Calling it again only updates the mode.
    """
    if mode not in MODES:
        raise LoraMonitorError(f"mode must be one of {MODES}, got {mode!r}")
    records = find_lora_modules(model, adapter_name)
    config = _peft_config(model, records[0].adapter_name) if records else None
    for record in records:
        _bind(record.module, _Binding(record.name, record.adapter_name, mode, config))
    return len(records)


def _bind(module: LoraLayer, binding: _Binding) -> None:
    if getattr(module, _BINDING, None) is None:
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
    setattr(module, _BINDING, binding)
