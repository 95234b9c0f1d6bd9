"""Scalar summaries of a spectrum (batched over leading dimensions): effective and stable rank, κ, energy."""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------------
# Scalar summaries of a spectrum (all batched over leading dimensions)
# --------------------------------------------------------------------------------------------------------


def effective_rank(S: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank: ``exp(H(p))`` with ``p = S/ΣS``. 0 for an all-zero spectrum (or one
    with NaN), NaN for one with an infinite value."""
    S = S.double().clamp_min(0)
    total = S.sum(-1, keepdim=True)
    # entr(p) = -p·log p, 0 at p = 0: a zero-padded spectrum needs no mask (half the calls of masking by
    # hand, and this runs on every check's spectra); the rows with nothing to divide are set below.
    entropy = torch.special.entr(S / total).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), 0.0)


def stable_rank(S: Tensor) -> Tensor:
    """``ΣS² / S₁²`` (``‖M‖²_F / ‖M‖²_2``). 0 for an all-zero spectrum."""
    S = S.double()
    top = S.max(-1).values
    return torch.where(top > 0, (S**2).sum(-1) / top.clamp_min(1e-300) ** 2, torch.zeros_like(top))


def condition_number_from_singular_values(S: Tensor, valid: Tensor | None = None) -> Tensor:
    """``σmax/σmin`` over all given singular values; ``inf`` when the smallest is zero (or all are).

    ``valid`` (a boolean mask shaped like ``S``) limits each row to its own values: the zero padding of a
    batch of spectra of different ranks is not a singular value.
    """
    S = S.double()
    top = S.max(-1).values
    if valid is not None:
        S = torch.where(valid, S, torch.full_like(S, math.inf))
    bottom = S.min(-1).values
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.full_like(top, math.inf))


def energy_curve(S: Tensor) -> Tensor:
    """Cumulative retained energy ``ΣS²[:k]/ΣS²`` for ``k = 1..len(S)`` (batched over leading dims).

    An all-zero spectrum has nothing to retain: its curve is NaN, never "100% retained".
    """
    energy = S.double() ** 2
    total = energy.sum(-1, keepdim=True)
    cumulative = energy.cumsum(-1)
    return torch.where(total > 0, cumulative / total.clamp_min(1e-300), torch.full_like(cumulative, math.nan))


# A retained fraction within this of a threshold reaches it, so that 1.0 is reached despite the rounding
# of a cumulative sum. The one place this rule is written: every "smallest rank that keeps X" uses it.
REACH_TOLERANCE = 1e-12


def reaches(fraction: float | Tensor, threshold: float) -> bool | Tensor:
    """True where a retained ``fraction`` reaches ``threshold`` (NaN never does)."""
    return fraction >= threshold - REACH_TOLERANCE


def rank_for_energy(S: Tensor, threshold: float) -> int:
    """Smallest ``k`` whose retained energy reaches ``threshold`` (0 for an all-zero spectrum)."""
    curve = energy_curve(S)
    if torch.isnan(curve).all():
        return 0
    reached = reaches(curve, threshold).nonzero()
    return int(reached[0]) + 1 if len(reached) else int(S.shape[-1])
