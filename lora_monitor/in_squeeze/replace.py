"""Putting factors of another rank into a live PEFT layer, with its ``r``, ``lora_alpha`` and config to match.

Shared by the resize mode, :func:`~lora_monitor.in_squeeze.compact_masks` and the load hook that makes room
for a checkpoint saved after a squeeze. Per-kind access to the factors is :mod:`lora_monitor.adapters.factors`;
the alpha that keeps the scale is :func:`lora_monitor.adapters.alpha_at_rank`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..adapters import (
    LoraModule,
    alpha_at_rank,
    factor_kind,
    factor_parameters,
    kept_rank,
    pattern_key,
    rank_fields,
    unwrap_model,
    zero_past,
)
from ..errors import LoraMonitorError


def zero_dropped_directions(tensor: torch.Tensor, kept: int, is_A: bool) -> None:
    """Zero the directions past ``kept``: rows of an A-shaped tensor, columns of a B-shaped one (under FSDP2,
    in this process's shard: no communication)."""
    zero_past(tensor, kept, 0 if is_A else 1)


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


def install_factors(
    module: LoraLayer, adapter_name: str, new_B: torch.Tensor, new_A: torch.Tensor
) -> tuple[nn.Parameter, nn.Parameter]:
    """Replace the adapter's factor parameters by new ones (given as matrices); returns the new ``(B, A)``."""
    old_B, old_A = factor_parameters(module, adapter_name)
    rank = new_A.shape[0]
    B_weight = new_B.reshape(old_B.shape[0], rank, *old_B.shape[2:]).to(old_B.dtype).contiguous()
    A_weight = new_A.reshape(rank, *old_A.shape[1:]).to(old_A.dtype).contiguous()
    if factor_kind(module, adapter_name) == "embedding":
        module.lora_embedding_B[adapter_name] = nn.Parameter(B_weight, requires_grad=old_B.requires_grad)
        module.lora_embedding_A[adapter_name] = nn.Parameter(A_weight, requires_grad=old_A.requires_grad)
    else:
        module.lora_B[adapter_name] = _new_factor_module(module.lora_B[adapter_name], B_weight, is_A=False)
        module.lora_A[adapter_name] = _new_factor_module(module.lora_A[adapter_name], A_weight, is_A=True)
    return factor_parameters(module, adapter_name)


def set_rank_keeping_scale(module: LoraLayer, adapter_name: str, new_rank: int) -> float:
    """Set ``r`` and ``lora_alpha`` for a new rank so that the scale is unchanged; returns the new alpha.

    ``module.scaling`` is left as it was, not recomputed from alpha/r, so that no rounding creeps in.
    """
    use_rslora = bool(module.use_rslora.get(adapter_name, False))
    alpha = alpha_at_rank(module.lora_alpha[adapter_name], module.r[adapter_name], new_rank, use_rslora)
    module.r[adapter_name] = new_rank
    module.lora_alpha[adapter_name] = alpha
    return float(alpha)


def saved_rank_and_alpha(module: LoraLayer, adapter_name: str) -> tuple[int, float]:
    """The ``(r, lora_alpha)`` an adapter saved now would carry for this module (mask mode: the kept rank)."""
    nominal, kept = module.r[adapter_name], kept_rank(module, adapter_name)
    use_rslora = bool(module.use_rslora.get(adapter_name, False))
    return kept, float(alpha_at_rank(module.lora_alpha[adapter_name], nominal, kept, use_rslora))


def adapter_config(model: nn.Module, adapter_name: str) -> Any | None:
    """The live model's ``LoraConfig`` of ``adapter_name`` (None for a bare module without one)."""
    configs = getattr(unwrap_model(model), "peft_config", None)
    return configs.get(adapter_name) if isinstance(configs, Mapping) else None


def write_module_pattern(config: Any, name: str, rank: int, alpha: float) -> None:
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


def compact_config(config: Any | None, records: Sequence[LoraModule]) -> None:
    """Rewrite a live ``LoraConfig`` from its modules' saved ranks and alphas, as few patterns as it takes.

    After a squeeze every module has its own anchored ``rank_pattern``/``alpha_pattern`` entry
    (:func:`write_module_pattern`); an adapter saved like that says ``r: 16`` with a pattern of 4s for every
    module. Here the commonest ``(rank, alpha)`` becomes ``r``/``lora_alpha`` and only the modules that
    differ keep an entry (:func:`~lora_monitor.adapters.rank_fields`), each module's scale exactly as it
    was. ``records`` are every LoRA module of the config's adapter (:func:`find_lora_modules`).
    """
    if config is None or not records:
        return
    targets = {record.name: saved_rank_and_alpha(record.module, record.adapter_name) for record in records}
    for field_name, value in rank_fields(targets).items():
        setattr(config, field_name, value)
