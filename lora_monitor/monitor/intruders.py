"""Intruder dimensions: new high-ranking directions of the fine-tuned weight that the base weight never had.

Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228): take the
top-``k`` left singular vectors ``y_j`` of the fine-tuned weight ``W + s·B@A``; ``y_j`` is an *intruder* when
its largest cosine similarity to the base weight's singular vectors ``x_i`` is below ``ε``. LoRA adapters
grow such directions where full fine-tuning does not, and the paper ties them to forgetting.

Cost: the fine-tuned top-``k`` comes from a randomized SVD of the implicit ``W + s·B@A`` (``ΔW`` is never
formed: only products with ``W``, ``A`` and ``B``), on the module's device. The base singular vectors do
not change while training (the base is frozen), so they are computed once per module and cached
(:class:`BaseSubspaceCache`): the top ``reference_rank`` (256 by default, all of them for narrower weights)
by randomized SVD, or all of them exactly (``reference_rank=None``, the paper's definition, minutes per
4096-wide weight on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..adapters import LoraModule
from ..errors import LoraMonitorError, check_number
from ..spectrum import LinearOperator, left_singular_vectors, randomized_svd

DEFAULT_TOP_K = 10
DEFAULT_EPSILON = 0.5
# Base directions compared with: the top 256 (all of them for narrower weights). The paper compares with
# every base direction, but an exact SVD of a 4096×4096 weight takes minutes on a CPU; the top 256 by
# randomized SVD take about a second and hold every direction a top-10 fine-tuned vector could come from
# unless the adapter rotated a weak base direction to the top. None: all of them, exactly.
DEFAULT_REFERENCE_RANK = 256


@dataclass
class IntruderDimensions:
    """One module's intruder count among the fine-tuned weight's top ``top_k`` directions.

    ``similarities[j]`` is the largest ``|cos|`` between the ``j``-th fine-tuned left singular vector and
    any base singular vector it was compared with; ``count`` is how many are below ``epsilon``.
    """

    name: str
    count: int
    top_k: int
    epsilon: float
    similarities: list[float] = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "count": self.count,
            "top_k": self.top_k,
            "epsilon": self.epsilon,
            "similarities": self.similarities,
        }


class BaseSubspaceCache:
    """The base weights' left singular vectors, computed once per module (the base is frozen).

    ``reference_rank`` keeps the top ones from a randomized SVD (all of them, exactly, when the weight is
    that narrow); ``None`` keeps all of them from an exact SVD.
    """

    def __init__(self, reference_rank: int | None = DEFAULT_REFERENCE_RANK) -> None:
        if reference_rank is not None:
            reference_rank = int(check_number(reference_rank, "reference_rank", low=1, whole=True))
        self.reference_rank = reference_rank
        self._vectors: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def vectors(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``m × p`` orthonormal columns: the base's top ``p`` left singular vectors (float32)."""
        cached = self._vectors.get(name)
        if cached is None:
            cached = left_singular_vectors(weight, self.reference_rank)
            self._vectors[name] = cached
        return cached


def _fine_tuned_operator(weight: torch.Tensor, module: LoraModule) -> LinearOperator:
    """``W + s·B@A`` as an operator: products with ``W`` and the factors, ``ΔW`` never formed."""
    W = weight.detach().float()
    B, A = (
        module.B.to(device=W.device, dtype=torch.float32),
        module.A.to(device=W.device, dtype=torch.float32),
    )
    # GPT-2's Conv1D stores its weight as in×out (PEFT's fan_in_fan_out); a saved adapter has no layer to
    # ask, so the shape decides there.
    if getattr(module.module, "fan_in_fan_out", False) or W.shape != (B.shape[0], A.shape[1]):
        W = W.mT
    scale = module.scale
    return LinearOperator(
        (W.shape[0], W.shape[1]),
        lambda X: W @ X + scale * (B @ (A @ X)),
        lambda Y: W.mT @ Y + scale * (A.mT @ (B.mT @ Y)),
        dtype=torch.float32,
        device=W.device,
    )


def operator_base(operator: LinearOperator, weight: torch.Tensor) -> torch.Tensor:
    """The base weight in the operator's orientation (``m × n``)."""
    return weight if tuple(weight.shape) == tuple(operator.shape) else weight.mT


def intruder_dimensions(
    modules: Sequence[LoraModule],
    base_weight: Callable[[LoraModule], torch.Tensor | None],
    *,
    top_k: int = DEFAULT_TOP_K,
    epsilon: float = DEFAULT_EPSILON,
    cache: BaseSubspaceCache | None = None,
    oversample: int = 10,
    power_iters: int = 4,
) -> list[IntruderDimensions]:
    """Count intruder dimensions per module (modules without a base weight are skipped).

    ``base_weight(module)`` returns the frozen (dequantized) base weight as a matrix, or None. ``top_k``
    and ``epsilon`` follow the paper (10 directions; ``ε = 0.5``); ``cache`` keeps the base subspaces
    between calls (pass the same one at every check of a training run). ``oversample`` and ``power_iters``
    set the randomized SVD's accuracy (``oversample`` large enough to cover the matrix makes it exact).
    """
    top_k = int(check_number(top_k, "top_k", low=1, whole=True))
    epsilon = check_number(epsilon, "epsilon", low=0, low_open=True, high=1, hint="a cosine similarity")
    oversample = int(check_number(oversample, "oversample", low=0, whole=True))
    power_iters = int(check_number(power_iters, "power_iters", low=0, whole=True))
    cache = cache if cache is not None else BaseSubspaceCache()
    generator = torch.Generator().manual_seed(0)
    results = []
    for module in modules:
        weight = base_weight(module)
        if weight is None:
            continue
        operator = _fine_tuned_operator(weight, module)
        k = min(top_k, *operator.shape)
        try:
            fine_tuned = randomized_svd(
                operator, k, oversample=oversample, power_iters=power_iters, generator=generator
            ).U
        except torch.linalg.LinAlgError as error:  # finite factors whose product overflows float32
            raise LoraMonitorError(
                f"module {module.name}: W + ΔW has no finite spectrum in float32 (factors too large?); "
                "no intruder dimensions were counted"
            ) from error
        reference = cache.vectors(module.name, operator_base(operator, weight))
        similarity = (reference.mT @ fine_tuned.to(reference.device)).abs().amax(dim=0)
        values = [float(v) for v in similarity.cpu()]
        results.append(
            IntruderDimensions(module.name, sum(v < epsilon for v in values), k, float(epsilon), values)
        )
    return results
