"""The effective rank of the gradient step through each LoRA pair, read where gradients exist."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..adapters import LoraModule, as_A_matrix, as_B_matrix, factor_parameters, full_tensor
from ..spectrum import effective_rank, lora_step_spectra

NAN = math.nan


def factor_gradients(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(∇B, ∇A)`` of a live module, shaped like ``B`` and ``A``; None when no gradient is present.

    A missing gradient on one factor (e.g. frozen) counts as zero.
    """
    if module.module is None:
        return None
    B_param, A_param = module.live_parameters or factor_parameters(module.module, module.adapter_name)
    if A_param.grad is None and B_param.grad is None:
        return None
    grad_A = A_param.grad.detach() if A_param.grad is not None else torch.zeros_like(A_param)
    grad_B = B_param.grad.detach() if B_param.grad is not None else torch.zeros_like(B_param)
    # FSDP2 shards gradients too: gathered whole (a collective: every process reads every module's, in order).
    grad_B, grad_A = as_B_matrix(full_tensor(grad_B)), as_A_matrix(full_tensor(grad_A))
    # Shaped like the record's factors: a masked module (In-Squeeze mask mode) shows its kept directions.
    # (Sliced only then: this runs for every module at every step of a monitor with every_n_steps=1.)
    if grad_B.shape[1] != module.rank:
        grad_B = grad_B[:, : module.rank]
    if grad_A.shape[0] != module.rank:
        grad_A = grad_A[: module.rank]
    return grad_B, grad_A


def gradient_effective_ranks(
    modules: Sequence[LoraModule], *, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Effective rank of the first-order gradient step through each adapter, by module name.

    A step along the factor gradients changes ``ΔW`` by ``s·(∇B·A + B·∇A) = s·[∇B, B] @ [A; ∇A]`` to first
    order: a LoRA pair of rank ``2r``, decomposed by the same engine (one batched call,
    :func:`~lora_monitor.spectrum.lora_step_spectra`). NaN where that
    step is zero or not finite; modules without gradients are left out. float32 is the default: an
    effective rank does not need the resolution a condition number does (directions below 3e-4 of the
    strongest add < 1e-3).
    """
    names, scales, factors = [], [], []
    for module in modules:
        grads = factor_gradients(module)
        if grads is None:
            continue
        grad_B, grad_A = grads
        factors.append((grad_B, module.B, module.A, grad_A))
        names.append(module.name)
        scales.append(module.scale)
    if not names:
        return {}
    ranks = dict.fromkeys(names, NAN)
    # Like the metrics: the batch is scanned for NaN/Inf only when the decomposition fails or returns them.
    try:
        spectra = lora_step_spectra(*zip(*factors, strict=True), scales, dtype=dtype)
        kept = list(range(len(names)))
    except (torch.linalg.LinAlgError, RuntimeError):
        spectra, kept = None, []
    if spectra is None or not bool(torch.isfinite(spectra).all()):
        kept = [
            index
            for index, four in enumerate(factors)
            if all(bool(torch.isfinite(matrix).all()) for matrix in four)
        ]
        if not kept:
            return ranks
        spectra = lora_step_spectra(
            *zip(*[factors[i] for i in kept], strict=True), [scales[i] for i in kept], dtype=dtype
        )
    spectra = spectra.cpu()
    usable = ((spectra[:, 0] > 0) & torch.isfinite(spectra).all(1)).tolist()
    values = effective_rank(spectra).tolist()
    for row, index in enumerate(kept):
        if usable[row]:
            ranks[names[index]] = values[row]
    return ranks
