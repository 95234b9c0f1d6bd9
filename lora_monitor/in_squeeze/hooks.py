"""Hooks on live PEFT layers: gradient masks (mask mode) and state-dict hooks for saving and resuming.

- Mask mode holds the dropped directions at zero: a gradient hook zeroes them on every backward pass.
- A squeezed model must save at its reduced rank and load a checkpoint saved after a squeeze into a
  freshly built, full-rank model. :func:`install_rank_hooks` binds each LoRA layer to a
  :class:`_RankHookBinding` (its path, adapter, mode and config), which its ``state_dict`` post-hook and
  ``load_state_dict`` pre-hook read.

Why resuming works: the Trainer loads a checkpoint's adapter before it builds the optimizer and loads the
optimizer's state, and before any ``on_train_begin``; so the hooks go in when the Trainer is created
(``on_init_end``). A checkpoint whose factors are smaller than the fresh model's gets room made for it
first (resize: new parameters of the saved rank, scale kept; mask: zero padding and the mask restored);
the optimizer is then built on the right shapes and its saved moments load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..adapters import (
    as_A_matrix,
    as_B_matrix,
    factor_parameters,
    find_lora_modules,
    full_tensor,
    is_masked,
    is_sharded,
    kept_rank,
    live_state_keys,
    nominal_rank,
    set_kept_rank,
)
from ..errors import check_choice
from .options import MODES
from .replace import (
    adapter_config,
    compact_config,
    install_factors,
    saved_rank_and_alpha,
    set_rank_keeping_scale,
    write_module_pattern,
    zero_dropped_directions,
)

# Attributes lora-monitor keeps on a LoraLayer.
_GRADIENT_MASKS = "lora_monitor_mask_hooks"  # {adapter: ((id(B), id(A)), [hook handles])}
_RANK_HOOK_BINDING = "lora_monitor_binding"  # the _RankHookBinding its state-dict hooks read
_CONFIG_HOOK = "lora_monitor_config_hook"  # on the model: compacts the config once a whole load is done


@dataclass
class _RankHookBinding:
    """What a layer's state-dict hooks need: its module path, adapter, squeeze mode and ``LoraConfig``."""

    name: str
    adapter_name: str
    mode: str
    config: Any | None


def ensure_gradient_mask(module: LoraLayer, adapter_name: str) -> None:
    """Gradient hooks that zero the dropped directions of both factors (the kept rank is read on every call)."""
    hooks = getattr(module, _GRADIENT_MASKS, None)
    if hooks is None:
        hooks = {}
        setattr(module, _GRADIENT_MASKS, hooks)
    B, A = factor_parameters(module, adapter_name)
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
            zero_dropped_directions(grad, kept, is_A)
            return grad

        return hook

    def masked_in_place(is_A: bool) -> Any:
        # FSDP2 computes with gathered copies and hands each process its shard of the gradient afterwards:
        # a hook on the sharded parameter's autograd never fires, its post-accumulate hook does.
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                zero_dropped_directions(param.grad, kept_rank(module, adapter_name), is_A)

        return hook

    if not B.requires_grad:
        handles = []
    elif is_sharded(B):
        handles = [
            B.register_post_accumulate_grad_hook(masked_in_place(False)),
            A.register_post_accumulate_grad_hook(masked_in_place(True)),
        ]
    else:
        handles = [B.register_hook(masked(False)), A.register_hook(masked(True))]
    hooks[adapter_name] = ((id(B), id(A)), handles)


def _state_dict_post_hook(module: LoraLayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # Mask mode: hand out only the kept directions, so that every saved adapter has the reduced rank.
    binding: _RankHookBinding | None = getattr(module, _RANK_HOOK_BINDING, None)
    if binding is None or not is_masked(module, binding.adapter_name):
        return
    # Under FSDP2 the entries are shards: gathered whole first (a collective; state_dict() is one anyway).
    kept = kept_rank(module, binding.adapter_name)
    key_B, key_A = live_state_keys(module, binding.adapter_name, prefix)
    if key_B in state_dict:
        state_dict[key_B] = full_tensor(state_dict[key_B])[:, :kept].clone()
    if key_A in state_dict:
        state_dict[key_A] = full_tensor(state_dict[key_A])[:kept].clone()


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
    binding: _RankHookBinding | None = getattr(module, _RANK_HOOK_BINDING, None)
    if binding is None:
        return
    adapter = binding.adapter_name
    key_B, key_A = live_state_keys(module, adapter, prefix)
    if key_A not in state_dict or key_B not in state_dict:
        return
    incoming = int(state_dict[key_A].shape[0])
    nominal = nominal_rank(module, adapter)
    if binding.mode == "mask":
        if incoming > nominal:
            return  # let PyTorch report the size mismatch
        B_param, A_param = factor_parameters(module, adapter)
        padded_B = torch.zeros(B_param.shape, dtype=state_dict[key_B].dtype)
        padded_A = torch.zeros(A_param.shape, dtype=state_dict[key_A].dtype)
        padded_B[:, :incoming] = state_dict[key_B]
        padded_A[:incoming] = state_dict[key_A]
        state_dict[key_B], state_dict[key_A] = padded_B, padded_A
        set_kept_rank(module, adapter, incoming if incoming < nominal else None)
        if incoming < nominal:
            ensure_gradient_mask(module, adapter)
    elif incoming != nominal:
        B_param, A_param = factor_parameters(module, adapter)
        new_B = torch.zeros(
            as_B_matrix(B_param).shape[0], incoming, dtype=B_param.dtype, device=B_param.device
        )
        new_A = torch.zeros(
            incoming, as_A_matrix(A_param).shape[1], dtype=A_param.dtype, device=A_param.device
        )
        install_factors(module, adapter, new_B, new_A)
        set_rank_keeping_scale(module, adapter, incoming)
    if binding.config is not None:
        write_module_pattern(binding.config, binding.name, *saved_rank_and_alpha(module, adapter))


def bind_rank_hooks(module: LoraLayer, name: str, adapter_name: str, mode: str, config: Any | None) -> None:
    """Hook one layer's state-dict saving and loading (once); a second call only updates what they read."""
    if getattr(module, _RANK_HOOK_BINDING, None) is None:
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
    setattr(module, _RANK_HOOK_BINDING, _RankHookBinding(name, adapter_name, mode, config))


def has_rank_hooks(module: LoraLayer) -> bool:
    """True once :func:`bind_rank_hooks` (or :func:`install_rank_hooks`) has hooked ``module``."""
    return getattr(module, _RANK_HOOK_BINDING, None) is not None


def install_rank_hooks(model: nn.Module, *, adapter_name: str | None = None, mode: str = "resize") -> int:
    """Make a live model save and load one adapter at its squeezed ranks; returns the modules hooked.

    After this, ``state_dict()`` (and so ``save_pretrained`` and every Trainer checkpoint) holds masked
    modules at their kept rank, and loading a state dict or checkpoint whose factors have a smaller rank
    than the live ones first makes room: ``mode="resize"`` gives the module new parameters of the incoming
    rank (scale kept); ``mode="mask"`` zero-pads the incoming factors and masks the extra directions. That
    is what lets ``Trainer.train(resume_from_checkpoint=...)`` resume a run saved after a squeeze on a
    freshly built model. Calling it again only updates the mode.
    """
    check_choice(mode, MODES, "mode")
    records = find_lora_modules(model, adapter_name)
    config = adapter_config(model, records[0].adapter_name) if records else None
    for record in records:
        bind_rank_hooks(record.module, record.name, record.adapter_name, mode, config)
    if config is not None and getattr(model, _CONFIG_HOOK, None) is None:
        # Each layer's pre-hook writes its own pattern entries; once the whole checkpoint is in, the config
        # says r: 4 for an adapter squeezed to 4 everywhere, as after the squeeze itself.
        def compact_after_load(module: nn.Module, incompatible_keys: Any) -> None:
            compact_config(config, records)

        setattr(model, _CONFIG_HOOK, model.register_load_state_dict_post_hook(compact_after_load))
    return len(records)
