"""What every decomposition in the engine shares: the SVD result type and the compute-precision rule.

``factored.py`` and ``randomized.py`` both import this module and nothing from each other's internals, so the
engine has no import cycle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor

COMPUTE_DTYPES = (torch.float32, torch.float64)


class SVDResult(NamedTuple):
    """``U diag(S) Vᵀ``: ``U`` is ``(..., m, k)``, ``S`` is ``(..., k)`` descending, ``V`` is ``(..., n, k)``."""

    U: Tensor
    S: Tensor
    V: Tensor


def check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` when the engine can compute in it (float32 or float64), else a ValueError."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def decomposition_dtype(*stored: torch.dtype) -> torch.dtype:
    """The dtype to decompose LoRA factors stored in ``stored`` dtypes in, when new factors are written from
    the result (compression, In-Squeeze's resize and mask, spectral editing): as exact as the stored factors
    can hold.

    float32 and float64 factors are decomposed in float64. The float32 Gram route's error grows like
    eps·σmax/σk in a kept direction k, and directions weaker than √eps = 3.4e-4 of a factor's strongest are
    below what a float32 Gram matrix resolves (reported as zero). Measured on fp32 pairs (1024×1024 and
    4096×1024, r = 16 and 64, B's columns spanning 10⁻¹ to 10⁻⁴), against a float64 dense SVD of the stored
    factors: float64 rebuilds the best rank-k delta to 3.6e-8 relative (the rounding of the fp32 factors
    it writes, in every case), float32 to 1.4e-7 to 3.4e-7 (4 to 9 times that), and to 4e-5 to 3e-4, with kept
    singular values lost, when B spans 10⁻⁴. 16-bit factors are decomposed in float32: that error stays below
    the rounding of the written bf16/fp16 factors (4e-3 and 5e-4 relative) unless σk < 3e-5·σmax, and
    float32 halves the time of the products. Monitoring, which writes nothing, chooses its own dtype
    (float32 by default, for speed).
    """
    return torch.float64 if any(dtype in COMPUTE_DTYPES for dtype in stored) else torch.float32
