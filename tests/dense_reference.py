"""Independent references for the tests: adapters with a decaying spectrum, and dense reference deltas.

The references here are computed independently of lora-monitor: PEFT's own ``get_delta_weight`` gives
each module's ``ΔW`` and a dense float64 ``torch.linalg.svd`` gives its best rank-k approximation.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

PREFIX = "base_model.model."


def decay_spectrum(model: torch.nn.Module, ratio: float = 0.55, adapter: str = "default") -> torch.nn.Module:
    """Scale row ``i`` of every ``A`` by ``ratio**i`` so each delta has clearly separated singular values."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if adapter in module.lora_A:
                A = module.lora_A[adapter].weight
            elif adapter in module.lora_embedding_A:
                A = module.lora_embedding_A[adapter]
            else:
                continue
            shape = (-1,) + (1,) * (A.dim() - 1)
            A.mul_((ratio ** torch.arange(A.shape[0], dtype=torch.float64)).to(A.dtype).reshape(shape))
    return model


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraLayer]:
    """The LoRA layers holding ``adapter``, by module name in the base model (PEFT's matching key)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            layers[name.removeprefix(PREFIX)] = module
    return layers


def dense_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Every module's ``ΔW`` from PEFT's ``get_delta_weight``, as a float64 matrix (conv flattened)."""
    return {
        name: layer.get_delta_weight(adapter).detach().double().flatten(1)
        for name, layer in lora_layers(model, adapter).items()
    }


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young: the dense truncated SVD of ``matrix`` in float64."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def energy_retained(matrix: torch.Tensor, k: int) -> float:
    """Fraction of ``‖M‖²_F`` in the top ``k`` singular values (dense SVD)."""
    S = torch.linalg.svdvals(matrix.double())
    return float((S[:k] ** 2).sum() / (S**2).sum())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())
