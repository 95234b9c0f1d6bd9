"""The optimizer state of squeezed factors: carried through the factor maps, or reset.

A squeeze makes the new factors by linear maps of the old ones (``B_new = B @ map_B``,
``A_new = map_A @ A``). Adam's first moments follow by the same maps, its second moments (averages of
squared gradients) by the element-wise squared maps; step counts and other scalars are kept. State of any
other shape (Adafactor's factored moments...) cannot be mapped and is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapters import as_A_matrix, as_B_matrix, full_tensor, is_sharded, write_whole
from ..errors import LoraMonitorError
from .replace import zero_dropped_directions

TensorMap = Callable[[torch.Tensor], torch.Tensor]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` behind Accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LoraMonitorError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def is_second_moment(key: str) -> bool:
    """True for averages of squared gradients (Adam's ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``)."""
    return "sq" in key


def right_map(matrix: torch.Tensor) -> TensorMap:
    """``X ↦ X @ matrix`` for a B-shaped tensor (m×r, or out×r×1×1), in the tensor's dtype."""

    def apply(value: torch.Tensor) -> torch.Tensor:
        out = as_B_matrix(value).to(torch.float64) @ matrix.to(value.device)
        return out.reshape(value.shape[0], matrix.shape[1], *value.shape[2:]).to(value.dtype).contiguous()

    return apply


def left_map(matrix: torch.Tensor) -> TensorMap:
    """``X ↦ matrix @ X`` for an A-shaped tensor (r×n, or r×in×kh×kw), in the tensor's dtype."""

    def apply(value: torch.Tensor) -> torch.Tensor:
        out = matrix.to(value.device) @ as_A_matrix(value).to(torch.float64)
        return out.reshape(matrix.shape[0], *value.shape[1:]).to(value.dtype).contiguous()

    return apply


def _map_state(
    state: dict[str, Any], old: torch.Tensor, apply: TensorMap, apply_squared: TensorMap
) -> dict[str, Any] | None:
    """Carry one parameter's optimizer state through the factor maps; None when it cannot be carried."""
    mapped: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.numel() == 1:
            mapped[key] = value  # step counts and other scalars are kept
        elif value.shape == old.shape:
            mapped[key] = (apply_squared if is_second_moment(key) else apply)(value)
        else:
            return None  # factored or otherwise shaped state (Adafactor...): it cannot be mapped
    return mapped


def swap_in_optimizer(
    optimizer: Any | None,
    swaps: list[tuple[nn.Parameter, nn.Parameter, TensorMap, TensorMap]],
    optimizer_state: str,
) -> None:
    """Put each new Parameter where its old one was in the param groups, with its state mapped or dropped.

    ``swaps`` holds ``(old, new, map, squared map)``; ``optimizer_state`` is ``"project"`` or ``"reset"``.
    """
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


def project_masked_state(
    optimizer: Any | None,
    factors: list[tuple[nn.Parameter, bool, torch.Tensor]],
    current: int,
    kept: int,
    optimizer_state: str,
) -> None:
    """Mask mode: map the state of the first ``current`` directions into the first ``kept``, zero the rest.

    ``factors`` holds ``(parameter, is_A, map)``: B-shaped state is multiplied by ``map`` on the right,
    A-shaped on the left (second moments by the squared map). ``"reset"`` drops the state instead.
    Under FSDP2 the moments are shards: each is gathered whole (a collective, in the same order in every
    process), mapped, and each process writes back its own shard.
    """
    if optimizer is None:
        return
    optimizer = unwrap_optimizer(optimizer)
    for param, is_A, matrix in factors:
        state = optimizer.state.get(param)
        if not state:
            continue
        if optimizer_state == "reset":
            optimizer.state.pop(param)
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            used = matrix.abs() ** 2 if is_second_moment(key) else matrix
            whole = full_tensor(value)  # the tensor itself, unless it is an FSDP2 shard
            with torch.no_grad():
                if is_A:
                    block = as_A_matrix(whole)
                    block[:kept] = (used.to(whole.device) @ block[:current].double()).to(whole.dtype)
                else:
                    block = as_B_matrix(whole)
                    block[:, :kept] = (block[:, :current].double() @ used.to(whole.device)).to(whole.dtype)
                zero_dropped_directions(whole, kept, is_A)
            if is_sharded(value):
                write_whole(value, whole)
