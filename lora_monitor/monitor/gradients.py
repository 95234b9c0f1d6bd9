"""The effective rank of the gradient step through each LoRA pair, read where gradients exist."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..adapters import LoraModule, factor_parameters, full_tensor
from ..spectrum import effective_rank, lora_spectra

NAN = math.nan


def factor_gradients(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(∇B, ∇A)`` of a live module, shaped like ``B`` and ``A``; None when no gradient is present.

    A missing gradient on one factor (e.g. frozen) counts as zero.
    """
    if module.module is None:
        return None
    B_param, A_param = factor_parameters(module.module, module.adapter_name)
    if A_param.grad is None and B_param.grad is None:
        return None
    grad_A = A_param.grad if A_param.grad is not None else torch.zeros_like(A_param)
    grad_B = B_param.grad if B_param.grad is not None else torch.zeros_like(B_param)
    # FSDP2 shards gradients too: gathered whole (a collective: every process reads every module's, in order).
    grad_B, grad_A = full_tensor(grad_B.detach()), full_tensor(grad_A.detach())
    # Shaped like the record's factors: a masked module (In-Squeeze mask mode) shows its kept directions.
    grad_B = grad_B.detach().reshape(grad_B.shape[0], -1)[:, : module.rank]
    grad_A = grad_A.detach().reshape(grad_A.shape[0], -1)[: module.rank]
    return grad_B, grad_A


def gradient_effective_ranks(
    modules: Sequence[LoraModule], *, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Effective rank of the first-order gradient step through each adapter, by module name.

    A step along the factor gradients changes ``ΔW`` by ``s·(∇B·A + B·∇A) = s·[∇B, B] @ [A; ∇A]`` to first
    order: a LoRA pair of rank ``2r``, decomposed by the same engine (one batched call). NaN where that
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
        factors.append((grad_B.float(), module.B.float(), module.A.float(), grad_A.float()))
        names.append(module.name)
        scales.append(module.scale)
    if not names:
        return {}
    # Gradients are orders of magnitude smaller than the weights: balance the two blocks of the left
    # factor (the product is unchanged) so that the Gram route does not lose the gradient directions
    # below its resolution floor. All the norms come back in one read, not two per module.
    norms = torch.stack(
        [torch.linalg.vector_norm(matrix) for grad_B, B, _, _ in factors for matrix in (grad_B, B)]
    ).tolist()
    lefts, rights = [], []
    for index, (grad_B, B, A, grad_A) in enumerate(factors):
        norm_grad_B, norm_B = _one_if_degenerate(norms[2 * index]), _one_if_degenerate(norms[2 * index + 1])
        lefts.append(torch.cat([grad_B / norm_grad_B, B / norm_B], dim=1))
        rights.append(torch.cat([A * norm_grad_B, grad_A * norm_B], dim=0))
    ranks = dict.fromkeys(names, NAN)
    # Like the metrics: the batch is scanned for NaN/Inf only when the decomposition fails or returns them.
    try:
        spectra = lora_spectra(lefts, rights, scales, dtype=dtype).delta
        kept = list(range(len(names)))
    except (torch.linalg.LinAlgError, RuntimeError):
        spectra, kept = None, []
    if spectra is None or not bool(torch.isfinite(spectra).all()):
        kept = [
            index
            for index, (left, right) in enumerate(zip(lefts, rights, strict=True))
            if bool(torch.isfinite(left).all() and torch.isfinite(right).all())
        ]
        if not kept:
            return ranks
        spectra = lora_spectra(
            [lefts[i] for i in kept], [rights[i] for i in kept], [scales[i] for i in kept], dtype=dtype
        ).delta
    spectra = spectra.cpu()
    usable = ((spectra[:, 0] > 0) & torch.isfinite(spectra).all(1)).tolist()
    values = effective_rank(spectra).tolist()
    for row, index in enumerate(kept):
        if usable[row]:
            ranks[names[index]] = values[row]
    return ranks


def _one_if_degenerate(norm: float) -> float:
    return norm if norm > 0 and math.isfinite(norm) else 1.0
