"""Where a LoRA pair's factors live, per kind of layer, and the names PEFT stores them under.

PEFT keeps a Linear or Conv pair as ``lora_A[name]``/``lora_B[name]`` sub-modules with a ``weight``, and an
Embedding pair as bare ``lora_embedding_A[name]``/``lora_embedding_B[name]`` parameters. As matrices,
``B`` is ``m×r`` (a conv ``lora_B`` kernel ``out×r×1×1``) and ``A`` is ``r×n`` (a conv kernel flattened to
``r×(in·kh·kw)``). This module is the one place that knows those shapes and names.

It also owns the *kept rank* of a live pair: In-Squeeze's mask mode keeps the parameter shapes and marks
how many leading directions are alive; every reader of the factors (records, metrics, squeeze, edit)
then sees only those, through :func:`live_factors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LoraMonitorError

if TYPE_CHECKING:  # PEFT is imported only where a live model is handled: reading a saved adapter needs
    # neither PEFT nor the transformers it imports
    from peft.tuners.lora import LoraLayer

PEFT_PREFIX = "base_model.model."
# Plain dict on a LoraLayer, {adapter name: rank}: the leading directions alive under a mask.
KEPT_RANK_ATTRIBUTE = "lora_monitor_kept_rank"
# The stored key suffixes of a pair's A and B (B's is A's with _A -> _B), and the kind they mean.
SAVED_A_SUFFIXES = {".lora_A.weight": "linear", ".lora_embedding_A": "embedding"}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


def factor_kind(module: LoraLayer, adapter_name: str) -> str:
    """``"linear"``, ``"conv"`` or ``"embedding"``: how ``module`` holds adapter ``adapter_name``."""
    if adapter_name in module.lora_A:
        return "conv" if module.lora_A[adapter_name].weight.dim() > 2 else "linear"
    if adapter_name in module.lora_embedding_A:
        return "embedding"
    raise LoraMonitorError(f"{type(module).__name__} has no LoRA adapter named {adapter_name!r}")


def factor_parameters(module: LoraLayer, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The live ``(B, A)`` Parameters in their stored shapes (looked up now: In-Squeeze may swap them)."""
    if factor_kind(module, adapter_name) == "embedding":
        return module.lora_embedding_B[adapter_name], module.lora_embedding_A[adapter_name]
    return module.lora_B[adapter_name].weight, module.lora_A[adapter_name].weight


def as_B_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``B`` as an ``m×r`` matrix (linear ``out×r``, conv ``out×r×1×1``, embedding ``dim×r``)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.dim() > 2 else tensor


def as_A_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``A`` as an ``r×n`` matrix (linear ``r×in``, conv ``r×in×kh×kw`` flattened)."""
    return tensor if tensor.dim() == 2 else tensor.reshape(tensor.shape[0], -1)


def nominal_rank(module: LoraLayer, adapter_name: str) -> int:
    """The rank the parameters have room for (their shape), whatever a mask keeps."""
    return int(factor_parameters(module, adapter_name)[1].shape[0])


def kept_rank(module: LoraLayer, adapter_name: str) -> int:
    """The rank the delta actually has: a mask's kept rank, else the parameters' rank."""
    kept = getattr(module, KEPT_RANK_ATTRIBUTE, {}).get(adapter_name)
    return int(kept) if kept is not None else nominal_rank(module, adapter_name)


def is_masked(module: LoraLayer, adapter_name: str) -> bool:
    """True when a mask keeps fewer directions than the parameters hold."""
    return adapter_name in getattr(module, KEPT_RANK_ATTRIBUTE, {})


def set_kept_rank(module: LoraLayer, adapter_name: str, rank: int | None) -> None:
    """Mark ``rank`` leading directions alive (None: no mask, every direction alive)."""
    kept = dict(getattr(module, KEPT_RANK_ATTRIBUTE, {}))
    if rank is None:
        kept.pop(adapter_name, None)
    else:
        kept[adapter_name] = int(rank)
    setattr(module, KEPT_RANK_ATTRIBUTE, kept)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 shards every parameter into one): each process holds only a part."""
    if type(tensor) in _PLAIN_TENSOR_TYPES:  # the answer for nearly every call, without the import below
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every process must ask, in the same order);
    a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This process's part of ``tensor`` and where it starts in the whole: an FSDP2 shard and its global
    offset, or a plain tensor itself at offset 0. Writing into the part writes into ``tensor``; no
    communication."""
    if not is_sharded(tensor):
        return tensor, (0,) * tensor.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), tuple(offset)


def write_whole(tensor: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` (a plain tensor of ``tensor``'s full shape) into ``tensor``, or into this process's
    shard of it under FSDP2 (no communication: every process must hold the same ``whole``)."""
    part, offset = local_part(tensor)
    source = whole
    for dim, (start, length) in enumerate(zip(offset, part.shape, strict=True)):
        source = source.narrow(dim, start, length)
    with torch.no_grad():
        part.copy_(source)


def zero_past(tensor: torch.Tensor, kept: int, dim: int) -> None:
    """Zero the entries of ``tensor`` at index ``kept`` and beyond along ``dim`` (in this process's shard
    under FSDP2: no communication)."""
    part, offset = local_part(tensor)
    start = min(max(kept - offset[dim], 0), part.shape[dim])
    with torch.no_grad():
        part.narrow(dim, start, part.shape[dim] - start).zero_()


def live_factors(module: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` as matrices, detached views of the live parameters, restricted to the kept directions.

    Under FSDP2 the parameters are shards: this gathers them, a collective (see :func:`gather_records`).
    """
    B_param, A_param = factor_parameters(module, adapter_name)
    B, A = as_B_matrix(full_tensor(B_param.detach())), as_A_matrix(full_tensor(A_param.detach()))
    if not is_masked(module, adapter_name):
        return B, A
    kept = kept_rank(module, adapter_name)
    return B[:, :kept], A[:kept]


def live_state_keys(module: LoraLayer, adapter_name: str, prefix: str) -> tuple[str, str]:
    """The ``(B, A)`` keys of ``module``'s own ``state_dict()`` under ``prefix`` (what its hooks see)."""
    if factor_kind(module, adapter_name) == "embedding":
        return f"{prefix}lora_embedding_B.{adapter_name}", f"{prefix}lora_embedding_A.{adapter_name}"
    return f"{prefix}lora_B.{adapter_name}.weight", f"{prefix}lora_A.{adapter_name}.weight"


def saved_keys(name: str, kind: str) -> dict[str, str]:
    """``{"A": key, "B": key}`` of module ``name`` in a saved ``adapter_model.safetensors``."""
    stem = PEFT_PREFIX + name
    if kind == "embedding":
        return {"A": stem + ".lora_embedding_A", "B": stem + ".lora_embedding_B"}
    return {"A": stem + ".lora_A.weight", "B": stem + ".lora_B.weight"}


def strip_prefix(key: str) -> str:
    """A saved key's module path without PEFT's ``base_model.model.`` prefix."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
