"""The spectrum engine (a package: ``factored`` for LoRA pairs, ``randomized`` for implicit and dense
matrices, ``summaries`` for scalars of a spectrum, ``common`` for the result type and the compute-precision
rule they share): singular values and vectors of LoRA deltas, and the scalar summaries of a spectrum.

This is the one place in lora-monitor that decomposes matrices. Monitoring, Post-Squeeze, In-Squeeze and
spectral editing all call it.

A LoRA delta ``ΔW = s · B @ A`` (``B: m×r``, ``A: r×n``) is decomposed without forming the ``m×n`` matrix:

    G_B = BᵀB = Q_B Λ_B Q_Bᵀ,  G_A = AAᵀ = Q_A Λ_A Q_Aᵀ     (r×r Gram matrices, one pass over each factor)
    R_B = Λ_B^½ Q_Bᵀ,          R_A = Λ_A^½ Q_Aᵀ                (B = Q̃_B R_B, Aᵀ = Q̃_A R_A: a thin QR)
    R_B R_Aᵀ = U_c S V_cᵀ                                      (SVD of an r×r core)
    ΔW = s · (Q̃_B U_c) S (Q̃_A V_c)ᵀ

The Gram route is a thin QR (Cholesky-QR, with an eigendecomposition so that rank-deficient factors such
as ``B = 0`` at initialisation work) whose only pass over the big factors is one matrix product each, the
cheapest thing a processor does. The factor products run in float32 by default (float64 on request,
exact to ~1e-12) and everything on ``r×r`` runs in float64. Directions weaker than ``√eps`` of the
strongest direction of a factor (3e-4 in float32, 1.5e-8 in float64) are below what the Gram matrix
resolves and are reported as exactly zero.

The singular values of ``A`` and ``B`` come out of the same pass (``Λ_A``, ``Λ_B``), which is what the
monitor's condition numbers use.
"""

from .common import SVDResult, decomposition_dtype
from .factored import (
    LoraSpectra,
    TruncatedFactors,
    condition_number,
    factored_svd,
    lora_spectra,
    lora_step_spectra,
    truncate_factors,
    truncate_many,
)
from .randomized import (
    LinearOperator,
    left_singular_vectors,
    randomized_svd,
    spectral_norm,
    weight_singular_values,
)
from .summaries import (
    REACH_TOLERANCE,
    condition_number_from_singular_values,
    effective_rank,
    energy_curve,
    rank_for_energy,
    reaches,
    stable_rank,
)

__all__ = [
    "REACH_TOLERANCE",
    "LinearOperator",
    "LoraSpectra",
    "SVDResult",
    "TruncatedFactors",
    "condition_number",
    "condition_number_from_singular_values",
    "decomposition_dtype",
    "effective_rank",
    "energy_curve",
    "factored_svd",
    "left_singular_vectors",
    "lora_spectra",
    "lora_step_spectra",
    "randomized_svd",
    "rank_for_energy",
    "reaches",
    "spectral_norm",
    "stable_rank",
    "truncate_factors",
    "truncate_many",
    "weight_singular_values",
]
