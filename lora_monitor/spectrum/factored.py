"""Singular values and vectors of LoRA deltas ``s·B@A`` from their factors (the method: see the package)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import check_choice, check_number
from .common import SVDResult, Tensor, check_compute_dtype
from .randomized import LinearOperator, randomized_svd
from .summaries import condition_number_from_singular_values, energy_curve

FactorInput = Tensor | Sequence[Tensor]
ScaleInput = float | Sequence[float] | Tensor


@dataclass
class LoraSpectra:
    """Singular values of a batch of LoRA pairs, all from one pass over the factors.

    ``delta`` holds the singular values of ``s·B@A`` and ``A``/``B`` those of the factors, each ``(N, r)``
    and descending. Zero-padded where a module's rank is below the batch's largest rank. ``A`` and ``B`` are
    None when they were not asked for (``lora_spectra(..., of_factors=False)``).
    """

    delta: Tensor
    A: Tensor | None
    B: Tensor | None


@dataclass
class _Cores:
    """The r×r pieces of one same-rank group, all float64: each factor as ``B = Q̃_B R_B`` and
    ``Aᵀ = Q̃_A R_A`` with ``Q̃ = factor @ inverse_root`` orthonormal on the factor's resolved directions
    (zero on those below resolution), and the SVD of the core ``R_B R_Aᵀ``, so ``B@A = Q̃_B core Q̃_Aᵀ``."""

    inverse_root_B: Tensor  # (N, r, r)
    inverse_root_A: Tensor
    core_U: Tensor  # (N, r, r) left singular vectors of the core
    core_S: Tensor  # (N, r) singular values of B@A (unscaled), descending
    core_V: Tensor


# --------------------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------------------


def _as_list(factors: FactorInput) -> list[Tensor]:
    if isinstance(factors, Tensor):
        if factors.dim() == 2:
            return [factors]
        if factors.dim() == 3:
            return list(factors.unbind(0))
        raise ValueError(
            f"expected a matrix or a stack of matrices, got a tensor of shape {tuple(factors.shape)}"
        )
    return list(factors)


def _as_scales(scale: ScaleInput, count: int) -> list[float]:
    if isinstance(scale, Tensor):
        values = [float(v) for v in scale.reshape(-1).tolist()]
    elif isinstance(scale, int | float):
        values = [float(scale)]
    else:
        values = [float(v) for v in scale]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"got {len(values)} scales for {count} LoRA pairs")
    return values


def _check_pairs(Bs: list[Tensor], As: list[Tensor]) -> None:
    if len(Bs) != len(As):
        raise ValueError(f"got {len(Bs)} B factors and {len(As)} A factors")
    for index, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"pair {index}: B {tuple(B.shape)} and A {tuple(A.shape)} are not an (m×r, r×n) LoRA pair"
            )


# --------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------


def _as_dtype(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """``matrix`` in ``dtype``, not converted (not even dispatched) when it already is: called per module."""
    return matrix if matrix.dtype == dtype else matrix.to(dtype)


def _gram(matrix: Tensor, dtype: torch.dtype, rows: bool) -> Tensor:
    """``M Mᵀ`` (rows=True) or ``MᵀM`` in ``dtype``; the one pass over a big factor."""
    matrix = _as_dtype(matrix.detach(), dtype)
    return matrix @ matrix.mT if rows else matrix.mT @ matrix


def _sym_eig_descending(gram: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    # Eigenvalues below eps·λmax are rounding noise of the Gram product: they are zero directions.
    return _floor_descending(eigenvalues, eps), eigenvectors.flip(-1)


def _floor_descending(eigenvalues: Tensor, eps: float) -> Tensor:
    """Descending eigenvalues with those below ``eps·λmax`` (rounding noise) set to exactly zero."""
    eigenvalues = eigenvalues.flip(-1)
    floor = eigenvalues[..., :1].clamp_min(0) * eps
    return torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))


def _unresolved(lower: Tensor, info: Tensor, eps: float) -> Tensor:
    """Indices of the Gram matrices whose Cholesky factorisation (``lower``, ``info``) cannot be trusted:
    it failed, or a pivot fell below ``eps·r`` of the largest. Every pivot bounds ``λmin`` from above, so
    a direction below the resolution floor almost always shows in one (one that does not stays at the
    rounding level it has)."""
    pivots = lower.diagonal(dim1=-2, dim2=-1).square()
    floored = pivots.amin(-1) <= eps * lower.shape[-1] * pivots.amax(-1)
    return ((info != 0) | floored).nonzero().squeeze(-1)


def _roots(gram: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``R`` with ``RᵀR = gram`` and its (pseudo-)inverse, for a float64 stack of Gram matrices.

    Where the factor is resolved to full rank, ``R`` is the upper Cholesky factor (a tenth of the cost of
    an eigendecomposition); where it is not (``B = 0`` at initialisation, a collapsed factor, a rank
    above what the factor holds), ``R = Λ^½ Qᵀ`` from the floored eigendecomposition and the inverse
    ``Q Λ^-½`` is zero on the directions below resolution, so that they count as exactly zero.
    """
    lower, info = torch.linalg.cholesky_ex(gram)
    root = lower.mT
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    inverse = torch.linalg.solve_triangular(root, identity.expand_as(root), upper=True)
    unresolved = _unresolved(lower, info, eps)
    if len(unresolved):
        values, vectors = _sym_eig_descending(gram[unresolved], eps)
        root[unresolved] = values.sqrt().unsqueeze(-1) * vectors.mT
        inverse[unresolved] = vectors * _safe_inverse_sqrt(values).unsqueeze(-2)
    return root, inverse


def _cores(gram_B: Tensor, gram_A: Tensor, eps: float, *, exact_small: bool = True) -> _Cores:
    """The cores of one same-rank group from its float64 Gram stacks.

    ``exact_small=False`` decomposes the core ``C`` through the eigenvectors of ``CCᵀ`` (``V = CᵀU/S``),
    half the cost of its SVD. A singular value ``σ`` then keeps ``eps₆₄·σmax²/σ`` of absolute precision
    instead of ``eps₆₄·σmax`` (still finer than the float32 Gram matrices resolve), and the vectors of the
    smallest values lose orthogonality. A truncation can afford that (those directions carry almost
    nothing of the delta); a caller of the vectors (:func:`factored_svd`) gets the SVD.
    """
    root_B, inverse_B = _roots(gram_B, eps)
    root_A, inverse_A = _roots(gram_A, eps)
    core = root_B @ root_A.mT
    if exact_small:
        core_U, core_S, core_Vh = torch.linalg.svd(core)
        return _Cores(inverse_B, inverse_A, core_U, core_S, core_Vh.mT)
    squared, vectors = torch.linalg.eigh(core @ core.mT)
    # below float64's rounding of CCᵀ: the zero directions of a floored factor, set to exactly zero
    core_S = _floor_descending(squared, torch.finfo(core.dtype).eps * core.shape[-1]).sqrt()
    core_U = vectors.flip(-1)
    core_V = (core.mT @ core_U) * torch.where(core_S > 0, 1 / core_S, torch.zeros_like(core_S)).unsqueeze(-2)
    return _Cores(inverse_B, inverse_A, core_U, core_S, core_V)


def _group_grams(
    Bs: list[Tensor], As: list[Tensor], indices: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``BᵀB`` and ``AAᵀ`` of the pairs at ``indices`` (same rank), float64 stacks ``(N, r, r)``.

    Each product is written straight into its slot of one preallocated stack: per module this is one
    matrix product and nothing else, because with hundreds of modules the Python and allocation overhead
    around the products, not the products themselves, is what separates the engine from the floor.
    (Stacking same-shaped factors into one ``bmm`` was measured 3.5× slower on 7B-shaped factors: the
    copy and the strided batched product cost more than the calls they save.)
    """
    rank = As[indices[0]].shape[0]
    device = As[indices[0]].device
    gram_B = torch.empty(len(indices), rank, rank, dtype=dtype, device=device)
    gram_A = torch.empty(len(indices), rank, rank, dtype=dtype, device=device)
    with torch.no_grad():
        for i, slot_B, slot_A in zip(indices, gram_B.unbind(0), gram_A.unbind(0), strict=True):
            B, A = _as_dtype(Bs[i], dtype), _as_dtype(As[i], dtype)
            torch.matmul(B.mT, B, out=slot_B)
            torch.matmul(A, A.mT, out=slot_A)
    return gram_B.double(), gram_A.double()


def _rank_groups(As: list[Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, A in enumerate(As):
        groups.setdefault(A.shape[0], []).append(index)
    return groups


def _grouped_cores(
    Bs: list[Tensor], As: list[Tensor], dtype: torch.dtype
) -> tuple[dict[int, list[int]], dict[int, _Cores]]:
    """Compute the r×r cores (with vectors) of every pair, batched over pairs of the same rank."""
    eps = torch.finfo(dtype).eps
    groups = _rank_groups(As)
    cores = {rank: _cores(*_group_grams(Bs, As, indices, dtype), eps) for rank, indices in groups.items()}
    return groups, cores


def _singular_values(
    gram_B: Tensor, gram_A: Tensor, eps: float, *, of_factors: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Singular values of ``B@A``, ``A`` and ``B`` from their Gram stacks, descending (those of
    ``A`` and ``B`` only ``of_factors``: ``None`` otherwise, two eigenvalue problems per module fewer).

    σ(BA)² are the eigenvalues of ``R_B G_A R_Bᵀ`` for any ``R_BᵀR_B = G_B``. Where ``B`` is resolved to
    full rank, ``R_Bᵀ`` is the Cholesky factor of ``G_B`` (a tenth of the cost of an eigendecomposition),
    and the symmetric eigenvalue problems per module (``G_B``, ``G_A``, the core) go through one batched
    call. Where ``B`` has directions below resolution (``B = 0`` at initialisation, a collapsed factor),
    ``R_B = Λ_B^½ Q_Bᵀ`` from the floored eigendecomposition instead, so that those directions count as
    exactly zero. Without ``of_factors`` that is decided from the Cholesky pivots (:func:`_unresolved`),
    without ``G_B``'s eigenvalues (what the effective rank of a gradient step can afford).
    """
    count, rank = gram_B.shape[0], gram_B.shape[-1]
    lower, info = torch.linalg.cholesky_ex(gram_B)
    core = lower.mT @ gram_A @ lower
    if of_factors:
        eigenvalues = torch.linalg.eigvalsh(torch.cat([gram_B, gram_A, core]))
        eig_B = _floor_descending(eigenvalues[:count], eps)
        eig_A = _floor_descending(eigenvalues[count : 2 * count], eps)
        squared = eigenvalues[-count:].clone()  # ascending, as _floor_descending expects
        unresolved = ((info != 0) | (eig_B[:, -1] <= 0)).nonzero().squeeze(-1)
    else:
        eig_B = eig_A = None
        squared = torch.linalg.eigvalsh(core)
        unresolved = _unresolved(lower, info, eps)
    if len(unresolved):
        values_B, vectors_B = torch.linalg.eigh(gram_B[unresolved])
        chosen_B = _floor_descending(values_B, eps)
        root_B = vectors_B.flip(-1) * chosen_B.sqrt().unsqueeze(-2)  # R_Bᵀ with floored directions removed
        squared[unresolved] = torch.linalg.eigvalsh(root_B.mT @ gram_A[unresolved] @ root_B)
    delta = _floor_descending(squared, eps * rank).sqrt()
    if not of_factors:
        return delta, None, None
    return delta, eig_A.sqrt(), eig_B.sqrt()


def _safe_inverse_sqrt(eigenvalues: Tensor) -> Tensor:
    return torch.where(eigenvalues > 0, eigenvalues.clamp_min(1e-300).rsqrt(), torch.zeros_like(eigenvalues))


def lora_spectra(
    B: FactorInput,
    A: FactorInput,
    scale: ScaleInput = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    of_factors: bool = True,
) -> LoraSpectra:
    """Singular values of ``scale·B@A``, of ``A`` and of ``B`` for many LoRA pairs in one pass.

    ``B`` and ``A`` are a pair of matrices, stacks ``(N, m, r)``/``(N, r, n)``, or lists of matrices of any
    shapes and ranks (nothing is copied into a stack). Results are float64 on the factors' device,
    ``(N, r_max)``, descending, zero-padded for pairs whose rank is below the largest. ``of_factors=False``
    gives only the delta's (``A`` and ``B`` None): two eigenvalue problems per pair fewer.
    """
    Bs, As = _as_list(B), _as_list(A)
    _check_pairs(Bs, As)
    scales = _as_scales(scale, len(Bs))
    dtype = check_compute_dtype(dtype)
    if not Bs:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return LoraSpectra(empty, empty, empty)
    device = Bs[0].device
    groups = _rank_groups(As)
    eps = torch.finfo(dtype).eps
    if len(groups) == 1:  # one rank (the usual case): the group's results are the batch's, in order
        grams = _group_grams(Bs, As, range(len(Bs)), dtype)
        delta, values_A, values_B = _singular_values(*grams, eps, of_factors=of_factors)
        magnitudes = torch.tensor([abs(value) for value in scales], dtype=torch.float64, device=device)
        return LoraSpectra(delta=delta * magnitudes.unsqueeze(-1), A=values_A, B=values_B)
    max_rank = max(groups)
    names = ("d", "a", "b") if of_factors else ("d",)
    out = {name: torch.zeros(len(Bs), max_rank, dtype=torch.float64, device=device) for name in names}
    for rank, indices in groups.items():
        grams = _group_grams(Bs, As, indices, dtype)
        delta, values_A, values_B = _singular_values(*grams, eps, of_factors=of_factors)
        index = torch.tensor(indices, device=device)
        group_scales = torch.tensor([abs(scales[i]) for i in indices], dtype=torch.float64, device=device)
        out["d"][index, :rank] = delta * group_scales.unsqueeze(-1)
        if of_factors:
            out["a"][index, :rank] = values_A
            out["b"][index, :rank] = values_B
    return LoraSpectra(delta=out["d"], A=out.get("a"), B=out.get("b"))


def lora_step_spectra(
    grad_B: Sequence[Tensor],
    B: Sequence[Tensor],
    A: Sequence[Tensor],
    grad_A: Sequence[Tensor],
    scale: ScaleInput = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Singular values of the first-order change ``s·(∇B·A + B·∇A)`` of many LoRA pairs, one batched pass.

    The change is the rank-``2r`` pair ``s·[∇B, B] @ [A; ∇A]``; its ``2r×2r`` Gram matrices are assembled
    from the blocks ``∇BᵀB``, ``A∇Aᵀ``... so the ``2r``-wide factors are never built (three products per
    side where the wide factor needs four, and no copies). The two halves are balanced to the same norm
    (``∇B/‖∇B‖, B/‖B‖`` with ``A·‖∇B‖, ∇A·‖B‖``: the product is unchanged) so that gradients orders of
    magnitude smaller than the weights stay above the Gram route's resolution floor. Returns float64
    ``(N, 2·r_max)``, descending, zero-padded.
    """
    grads_B, Bs, As, grads_A = list(grad_B), list(B), list(A), list(grad_A)
    _check_steps(grads_B, Bs, As, grads_A)
    scales = _as_scales(scale, len(Bs))
    dtype = check_compute_dtype(dtype)
    device = Bs[0].device if Bs else torch.device("cpu")
    groups = _rank_groups(As)
    max_rank = max(groups, default=0)
    out = torch.zeros(len(Bs), 2 * max_rank, dtype=torch.float64, device=device)
    eps = torch.finfo(dtype).eps
    for rank, indices in groups.items():
        left = torch.empty(len(indices), 2 * rank, 2 * rank, dtype=dtype, device=device)
        right = torch.empty_like(left)
        with torch.no_grad():
            # unbind: every slot's view in one call (indexing the stack per module costs a call each)
            for i, left_slot, right_slot in zip(indices, left.unbind(0), right.unbind(0), strict=True):
                _block_gram(left_slot, _as_dtype(grads_B[i], dtype), _as_dtype(Bs[i], dtype), rows=False)
                _block_gram(right_slot, _as_dtype(As[i], dtype), _as_dtype(grads_A[i], dtype), rows=True)
        # The 2r×2r stage stays in the compute dtype: the Gram matrices hold its rounding already, and an
        # effective rank needs no more (float64 here cost a third more per step of a monitor every step).
        # ‖∇B‖² and ‖B‖² are the traces of the diagonal blocks: the balancing needs no other pass.
        norms = left.diagonal(dim1=-2, dim2=-1).reshape(len(indices), 2, rank).sum(-1).sqrt()
        norms = torch.where((norms > 0) & torch.isfinite(norms), norms, 1.0)
        balance = norms.repeat_interleave(rank, dim=1)
        balance = balance.unsqueeze(-1) * balance.unsqueeze(-2)
        delta, _, _ = _singular_values(left.div_(balance), right.mul_(balance), eps, of_factors=False)
        group_scales = torch.tensor([abs(scales[i]) for i in indices], dtype=torch.float64, device=device)
        delta = delta * group_scales.unsqueeze(-1)
        if len(indices) == len(Bs):  # one rank group (the usual case): the rows are in order already
            out[:, : 2 * rank] = delta
        else:
            out[torch.tensor(indices, device=device), : 2 * rank] = delta
    return out


def _check_steps(grads_B: list[Tensor], Bs: list[Tensor], As: list[Tensor], grads_A: list[Tensor]) -> None:
    """Every ``(∇B, B, A, ∇A)`` is a LoRA pair with its gradients shaped like it; one pass (per step)."""
    if not len(grads_B) == len(Bs) == len(As) == len(grads_A):
        raise ValueError(
            f"got {len(grads_B)} ∇B, {len(Bs)} B, {len(As)} A and {len(grads_A)} ∇A: one of each per pair"
        )
    for index, (grad_B, B, A, grad_A) in enumerate(zip(grads_B, Bs, As, grads_A, strict=True)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"pair {index}: B {tuple(B.shape)} and A {tuple(A.shape)} are not an (m×r, r×n) LoRA pair"
            )
        if grad_B.shape != B.shape or grad_A.shape != A.shape:
            raise ValueError(
                f"pair {index}: gradients {tuple(grad_B.shape)} and {tuple(grad_A.shape)} are not shaped like "
                f"B {tuple(B.shape)} and A {tuple(A.shape)}"
            )


# Below this many elements per factor, joining the two factors and taking one product is faster than the
# three block products (fewer calls: 30 against 71 µs per 512-wide r=16 module); above it the copy costs
# more than the calls (245 against 216 µs at 4096 wide). Measured on one CPU thread, same results to the bit.
_JOIN_BELOW_ELEMENTS = 1 << 16


def _block_gram(slot: Tensor, first: Tensor, second: Tensor, rows: bool) -> None:
    """The Gram matrix of ``[first, second]`` (side by side; stacked when ``rows``) written into ``slot``."""
    if first.numel() < _JOIN_BELOW_ELEMENTS:
        if rows:
            joined = torch.cat([first, second], 0)
            torch.matmul(joined, joined.mT, out=slot)
        else:
            joined = torch.cat([first, second], 1)
            torch.matmul(joined.mT, joined, out=slot)
        return
    rank = first.shape[0] if rows else first.shape[1]
    if rows:
        slot[:rank, :rank] = first @ first.mT
        slot[rank:, rank:] = second @ second.mT
        slot[:rank, rank:] = first @ second.mT
    else:
        slot[:rank, :rank] = first.mT @ first
        slot[rank:, rank:] = second.mT @ second
        slot[:rank, rank:] = first.mT @ second
    slot[rank:, :rank] = slot[:rank, rank:].mT


def factored_svd(
    B: FactorInput,
    A: FactorInput,
    scale: ScaleInput = 1.0,
    k: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> SVDResult | list[SVDResult]:
    """Exact SVD of ``scale·B@A`` without forming it: thin QR of ``B`` and ``Aᵀ``, SVD of the r×r core.

    ``B``/``A`` may be one pair (returns one :class:`SVDResult`), a stack ``(N, m, r)``/``(N, r, n)``
    (returns a stacked result), or lists of pairs of any shapes (returns a list). ``k`` keeps the top-k
    triplets. ``U``, ``V`` come back in ``dtype`` (float32 by default, float64 on request) on the factors'
    device; ``S`` is float64. Columns of ``U``/``V`` that belong to a zero singular value are zero.
    """
    single = isinstance(B, Tensor) and B.dim() == 2
    stacked = isinstance(B, Tensor) and B.dim() == 3
    Bs, As = _as_list(B), _as_list(A)
    _check_pairs(Bs, As)
    scales = _as_scales(scale, len(Bs))
    dtype = check_compute_dtype(dtype)
    groups, cores = _grouped_cores(Bs, As, dtype)
    results: list[SVDResult | None] = [None] * len(Bs)
    for rank, indices in groups.items():
        core = cores[rank]
        keep = rank if k is None else min(k, rank)
        # U = Q̃_B U_c = B R_B⁻¹ U_c ; V = Q̃_A V_c = Aᵀ R_A⁻¹ V_c  (small maps, then one product)
        map_U = core.inverse_root_B @ core.core_U[..., :keep]
        map_V = core.inverse_root_A @ core.core_V[..., :keep]
        for position, i in enumerate(indices):
            sign = -1.0 if scales[i] < 0 else 1.0
            U = Bs[i].detach().to(dtype) @ (sign * map_U[position]).to(dtype)
            V = As[i].detach().to(dtype).mT @ map_V[position].to(dtype)
            S = core.core_S[position, :keep] * abs(scales[i])
            results[i] = SVDResult(U, S, V)
    if single:
        return results[0]  # type: ignore[return-value]
    if stacked:
        return SVDResult(*(torch.stack(parts) for parts in zip(*results, strict=True)))
    return results  # type: ignore[return-value]


@dataclass
class TruncatedFactors:
    """A rank-``k`` LoRA pair ``B_new @ A_new`` closest (in every unitarily invariant norm) to ``B @ A``.

    The scale is not included: ``B_new @ A_new ≈ B @ A``. ``map_B`` (``r×k``) and ``map_A`` (``k×r``) are the
    linear maps that made the new factors, ``B_new = B @ map_B`` and ``A_new = map_A @ A``; the same maps
    carry optimizer moments over. ``retained`` is the fraction of ``‖BA‖²_F`` kept (NaN for a zero delta).
    """

    B: Tensor
    A: Tensor
    map_B: Tensor
    map_A: Tensor
    singular_values: Tensor
    retained: float


def truncate_factors(
    B: Tensor,
    A: Tensor,
    k: int,
    *,
    dtype: torch.dtype = torch.float32,
    method: str = "qr",
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> TruncatedFactors:
    """Best (``method="qr"``) or near-best (``"rsvd"``) rank-``k`` factors of one LoRA pair, ``√S`` split
    between the new ``B`` and ``A``.

    ``"qr"`` is the exact factored SVD. ``"rsvd"`` is a randomized SVD of the never-formed ``B@A`` (see
    :func:`randomized_svd`: ``oversample`` extra probes, ``power_iters`` power iterations, ``generator`` for
    the probes); it is exact whenever ``k + oversample`` reaches the rank. Either way ``map_B``/``map_A`` are
    float64 and ``retained`` is the energy kept, ``ΣS_k²``, over ``‖B@A‖²_F`` computed exactly from the
    factors' Gram matrices (``trace(BᵀB · AAᵀ)``), capped at 1. The new factors have ``B``'s and ``A``'s
    dtype and device. ``k`` above the rank keeps the rank.
    """
    check_number(k, "target rank", low=1, whole=True)
    check_choice(method, ("qr", "rsvd"), "method")
    _check_pairs([B], [A])
    compute = check_compute_dtype(dtype)
    if method == "rsvd":
        return _truncate_factors_randomized(B, A, k, compute, oversample, power_iters, generator)
    return truncate_many([B], [A], [k], dtype=compute)[0]


# Pairs truncated together on the CPU. Small, so that each factor's float32 copy is still in cache for its
# second product; not 1, because the dozens of small r×r operations per batch then cost more than the
# products. Measured on bench/squeeze.py's 7B-shaped r=64 adapter (one thread, warm process, median of 5):
# 0.68 s at 1, 0.62 at 4, 0.67 at 8, 0.70 at 32. Elsewhere a same-rank group is one batch (GPU launches).
_CPU_TRUNCATION_BATCH = 4


def truncate_many(
    Bs: Sequence[Tensor], As: Sequence[Tensor], ks: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> list[TruncatedFactors]:
    """:func:`truncate_factors` (exact, ``"qr"``) for many LoRA pairs at once, pair ``i`` to rank ``ks[i]``.

    Pairs of the same rank are decomposed together (the r×r work of a batch in one call per step), each
    factor is converted to the compute dtype once, and per pair what is left is one Gram product per factor
    and one product per new factor: a whole adapter is truncated at about the cost of reading its factors
    twice. Each result is the one ``truncate_factors`` gives.
    """
    Bs, As = list(Bs), list(As)
    if len(ks) != len(Bs):
        raise ValueError(f"got {len(ks)} target ranks for {len(Bs)} LoRA pairs")
    if any(k < 1 for k in ks):
        raise ValueError(f"target ranks must be at least 1, got {min(ks)}")
    _check_pairs(Bs, As)
    compute = check_compute_dtype(dtype)
    eps = torch.finfo(compute).eps
    results: list[TruncatedFactors | None] = [None] * len(Bs)
    for indices in _rank_groups(As).values():
        size = len(indices) if Bs[indices[0]].device.type != "cpu" else _CPU_TRUNCATION_BATCH
        for start in range(0, len(indices), size):
            batch = indices[start : start + size]
            # Each factor is converted to the compute dtype once, for its Gram product and its new factor.
            B_work = [_as_dtype(Bs[i].detach(), compute) for i in batch]
            A_work = [_as_dtype(As[i].detach(), compute) for i in batch]
            grams = _group_grams(B_work, A_work, list(range(len(batch))), compute)
            core = _cores(*grams, eps, exact_small=False)
            root = core.core_S.sqrt().unsqueeze(-2)
            # B_new = U_k S_k^½ = B · (R_B⁻¹ U_c,k S_k^½) ; A_new = S_k^½ V_kᵀ = (S_k^½ V_c,kᵀ R_A⁻ᵀ) · A
            maps_B = core.inverse_root_B @ (core.core_U * root)
            maps_A = (core.inverse_root_A @ (core.core_V * root)).mT
            work_maps_B, work_maps_A = maps_B.to(compute), maps_A.to(compute)
            curves = energy_curve(core.core_S).tolist()
            for position, i in enumerate(batch):
                keep = min(ks[i], As[i].shape[0])
                new_B = (B_work[position] @ work_maps_B[position, :, :keep]).to(Bs[i].dtype)
                new_A = (work_maps_A[position, :keep] @ A_work[position]).to(As[i].dtype)
                results[i] = TruncatedFactors(
                    new_B,
                    new_A,
                    maps_B[position, :, :keep],
                    maps_A[position, :keep],
                    core.core_S[position],
                    curves[position][keep - 1],
                )
    return results  # type: ignore[return-value]


def _truncate_factors_randomized(
    B: Tensor,
    A: Tensor,
    k: int,
    dtype: torch.dtype,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> TruncatedFactors:
    # RSVD of the operator B@A (never formed): U S Vᵀ. Then B_new = U S^½ = B (A V S^-½) and
    # A_new = S^½ Vᵀ = (S^-½ Uᵀ B) A, so the maps that made (and carry optimizer state to) the new factors
    # are A V S^-½ and S^-½ Uᵀ B.
    result = randomized_svd(
        LinearOperator.from_factors(B, A, dtype=dtype),
        k,
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
        dtype=dtype,
    )
    S = result.S.to(dtype)
    root, inverse_root = S.sqrt(), _safe_inverse_sqrt(S)
    B_work, A_work = B.detach().to(dtype), A.detach().to(dtype)
    new_B = (result.U.to(dtype) * root).to(B.dtype)
    new_A = (result.V.to(dtype) * root).mT.to(A.dtype)
    map_B = ((A_work @ result.V.to(dtype)) * inverse_root).double()
    map_A = ((result.U.to(dtype).mT @ B_work) * inverse_root.unsqueeze(-1)).double()
    # ‖BA‖²_F = trace(BᵀB · AAᵀ): two r×r Gram matrices (float64), no decomposition.
    total = float((_gram(B, torch.float64, rows=False) * _gram(A, torch.float64, rows=True)).sum())
    kept_energy = float((result.S.double() ** 2).sum())
    retained = min(kept_energy / total, 1.0) if total > 0 else math.nan
    return TruncatedFactors(new_B, new_A, map_B, map_A, result.S.double(), retained)


def condition_number(M: Tensor) -> Tensor:
    """``σmax/σmin`` over the ``min(m, n)`` singular values of ``M`` (batched); ``inf`` if rank-deficient.

    A zero matrix has no defined conditioning and gives ``inf``, never 1. Computed in float64 from the
    Gram matrix of the short side, with the same resolution floor as the rest of the engine.
    """
    M = M.detach()
    if M.dim() > 3 or M.dim() < 2:
        raise ValueError(f"condition_number expects a matrix or a stack, got shape {tuple(M.shape)}")
    rows = M.shape[-2] <= M.shape[-1]
    gram = _gram(M, torch.float64, rows=rows)
    eigenvalues = _floor_descending(torch.linalg.eigvalsh(gram), torch.finfo(torch.float64).eps)
    return condition_number_from_singular_values(eigenvalues.sqrt())
