"""Randomized SVD for deltas that are not in factored form, spectral norms of frozen weights, dense spectra."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import check_device, check_number
from .common import SVDResult, Tensor, check_compute_dtype, decomposition_dtype

# --------------------------------------------------------------------------------------------------------
# Randomized SVD, for deltas that are not in factored form
# --------------------------------------------------------------------------------------------------------


class LinearOperator:
    """A matrix known only through its products: ``op @ X`` and ``op.mT @ Y``.

    ``matmul(X)`` must return ``M @ X`` for ``X`` of shape ``(n, p)``; ``rmatmul(Y)`` must return ``Mᵀ @ Y``
    for ``Y`` of shape ``(m, p)``.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        matmul: Callable[[Tensor], Tensor],
        rmatmul: Callable[[Tensor], Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = tuple(shape)
        self._matmul = matmul
        self._rmatmul = rmatmul
        self.dtype = dtype
        self.device = torch.device(device)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self._matmul(other)

    @property
    def mT(self) -> LinearOperator:
        return LinearOperator(
            (self.shape[1], self.shape[0]), self._rmatmul, self._matmul, dtype=self.dtype, device=self.device
        )

    @classmethod
    def from_factors(
        cls, B: Tensor, A: Tensor, scale: float = 1.0, *, dtype: torch.dtype | None = None
    ) -> LinearOperator:
        """``scale·B@A`` as an operator, never formed, whose products run in ``dtype`` (float32 or float64;
        default: :func:`~lora_monitor.spectrum.decomposition_dtype` of the factors). Probes of another dtype
        are converted to it."""
        dtype = decomposition_dtype(B.dtype, A.dtype) if dtype is None else check_compute_dtype(dtype)
        B_work, A_work = B.detach().to(dtype), A.detach().to(dtype)
        return cls(
            (B.shape[0], A.shape[1]),
            lambda X: scale * (B_work @ (A_work @ X.to(dtype))),
            lambda Y: scale * (A_work.mT @ (B_work.mT @ Y.to(dtype))),
            dtype=dtype,
            device=B.device,
        )


def randomized_svd(
    matrix_or_operator: Tensor | LinearOperator,
    k: int,
    oversample: int = 10,
    power_iters: int = 2,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> SVDResult:
    """Approximate top-``k`` SVD (Halko, Martinsson & Tropp) of a matrix or a :class:`LinearOperator`.

    Uses ``k + oversample`` random probes and ``power_iters`` re-orthonormalised power iterations; the error
    shrinks like ``(σ_{k+oversample+1}/σ_k)^(2·power_iters+1)``. Deterministic for a given ``generator``
    (seed 0 when none is given). Works in ``dtype`` (float32 or float64) on the input's device.
    """
    dtype = check_compute_dtype(dtype)
    if isinstance(matrix_or_operator, Tensor):
        if matrix_or_operator.dim() != 2:
            raise ValueError(f"randomized_svd expects a matrix, got shape {tuple(matrix_or_operator.shape)}")
        matrix = matrix_or_operator.detach().to(dtype)
        operator = LinearOperator(
            tuple(matrix.shape), matrix.__matmul__, matrix.mT.__matmul__, dtype=dtype, device=matrix.device
        )
    else:
        operator = matrix_or_operator
    m, n = operator.shape
    check_number(k, "k", low=1, whole=True)
    check_number(oversample, "oversample", low=0, whole=True)
    check_number(power_iters, "power_iters", low=0, whole=True)
    probes = min(k + oversample, m, n)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(n, probes, generator=generator, dtype=dtype).to(operator.device)
    Q, _ = torch.linalg.qr((operator @ omega).to(dtype))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr((operator.mT @ Q).to(dtype))
        Q, _ = torch.linalg.qr((operator @ Z).to(dtype))
    small = (operator.mT @ Q).to(dtype).mT  # Qᵀ M, probes×n
    U_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    keep = min(k, S.shape[0])
    return SVDResult(Q @ U_small[:, :keep], S[:keep], Vh[:keep].mT)


def spectral_norm(
    W: Tensor, iters: int = 4, *, dequantize: Callable[[Tensor], Tensor] | None = None
) -> float:
    """σmax of a (frozen) weight by randomized subspace iteration: a few products, no full SVD.

    ``iters`` power iterations on an 8-vector block: within 2% even on a Gaussian matrix (no spectral gap,
    the worst case), far closer on trained weights whose top singular value stands out.
    Conv kernels are flattened to ``out × (in·kh·kw)``. ``dequantize`` turns a quantized weight into a float
    one first.
    """
    if dequantize is not None:
        W = dequantize(W)
    W = W.detach()
    if W.dim() > 2:
        W = W.reshape(W.shape[0], -1)
    if not W.is_floating_point():
        raise ValueError(f"spectral_norm needs a floating-point weight, got {W.dtype}: dequantize it first")
    return float(randomized_svd(W, k=1, oversample=7, power_iters=iters).S[0])


def weight_singular_values(
    weights: Sequence[Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    batch_size: int = 16,
    max_batch_bytes: int = 1 << 30,
    progress: bool = False,
    description: str = "singular values",
) -> list[Tensor]:
    """All singular values of many dense matrices (frozen base weights, gradients), one full SVD each.

    Here the full spectrum is the point (heavy-tail fits need every eigenvalue), so nothing is factored:
    weights of the same shape are stacked and go through ``torch.linalg.svdvals`` in batches of at most
    ``batch_size`` matrices and ``max_batch_bytes`` bytes, on ``device`` (default: the GPU when there is
    one, else the weights' own device), in ``dtype`` (float64 by default, float32 on request). Tensors with
    more than two dimensions (conv kernels) are flattened to ``out × rest``. ``progress`` shows a tqdm bar.

    Returns one float64 CPU tensor per weight, in input order, descending, of length ``min(m, n)``.
    """
    dtype = check_compute_dtype(dtype)
    matrices = [W.detach().reshape(W.shape[0], -1) if W.dim() != 2 else W.detach() for W in weights]
    for index, W in enumerate(matrices):
        if W.dim() != 2 or not W.is_floating_point():
            raise ValueError(f"weight {index}: need a floating-point matrix, got {W.dtype} {tuple(W.shape)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    device = check_device(device)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, W in enumerate(matrices):
        groups.setdefault(tuple(W.shape), []).append(index)
    results: list[Tensor | None] = [None] * len(matrices)
    element_bytes = torch.finfo(dtype).bits // 8
    from tqdm.auto import tqdm

    with tqdm(total=len(matrices), desc=description, disable=not progress, leave=False) as bar:
        for (m, n), indices in groups.items():
            # Big matrices go fewer at a time so that a stack never exceeds the memory budget.
            per_batch = max(1, min(batch_size, max_batch_bytes // max(1, m * n * element_bytes)))
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                target = device if device is not None else matrices[chunk[0]].device
                stack = torch.stack([matrices[i].to(device=target, dtype=dtype) for i in chunk])
                values = torch.linalg.svdvals(stack).to(device="cpu", dtype=torch.float64)
                for position, i in enumerate(chunk):
                    results[i] = values[position]
                bar.update(len(chunk))
    return results  # type: ignore[return-value]


def left_singular_vectors(matrix: Tensor, rank: int | None = None) -> Tensor:
    """The top ``rank`` left singular vectors of a dense matrix as ``m × rank`` float32 columns: all of them
    from an exact SVD when ``rank`` is None or covers the matrix, else from :func:`randomized_svd`."""
    matrix = matrix.detach().float()
    if rank is None or rank >= min(matrix.shape):
        return torch.linalg.svd(matrix, full_matrices=False).U
    return randomized_svd(matrix, rank).U
