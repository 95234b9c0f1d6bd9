"""After a squeeze, scale each squeezed module's optimizer step by how much its rank shrank.

Why: with ``lora_alpha = r`` (scale 1 at every rank) the optimizer never sees the rank, yet how fast
``B@A`` moves per step grows with ``r`` (each of the ``r`` directions contributes a step of its own). A
rank-8 adapter therefore learns about 8× slower than a rank-64 one at the same learning rate: direct r=8
training needs ~8× the learning rate of r=64 (``bench/EVIDENCE.md``). A run squeezed 64 → 8 at r=64's
learning rate slows down by the same factor after each squeeze and never relearns what the truncations
removed; the default In-Squeeze schedule lost 10 points of test accuracy that way, and scaling each squeezed
module's step by ``r_source / r_now`` recovered all of them.

How: every LoRA factor of a squeezed module is moved ``factor`` times as far as the optimizer moved it
(``p ← p_old + factor·(p_new − p_old)``). For SGD, Adam and AdamW (decoupled weight decay included) this is
exactly a learning rate ``factor`` times larger for those parameters alone; the optimizer's moments are
untouched, and nothing else (the head, other adapters) changes. Per module, so per-module ranks
(``min_variance_retention``) each get their own factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..adapters import factor_parameters, find_lora_modules, kept_rank
from ..errors import check_choice
from .options import STEP_SCALINGS

_FACTOR: dict[str, Callable[[float], float]] = {"rank": lambda ratio: ratio, "sqrt": math.sqrt}


class SqueezedStepScaling:
    """Scale squeezed modules' optimizer steps by ``r_source/r_now`` (``"rank"``), its square root, or not.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after it. The
    source ranks are read at the first call (before any squeeze); a run resumed after a squeeze must set
    :attr:`source_ranks` back from its checkpoint (``InSqueezeCallback`` does), or the factors are lost.
    """

    def __init__(self, scaling: str = "rank", adapter_name: str | None = None, *, where: str = "") -> None:
        """``where``: what an error message names first, what was given ``scaling`` (the caller's name)."""
        self.scaling = check_choice(scaling, STEP_SCALINGS, "lr_scaling", where)
        self.adapter_name = adapter_name
        self._source_ranks: dict[str, int] | None = None
        self._before: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    @property
    def source_ranks(self) -> dict[str, int] | None:
        """``{module: rank before any squeeze}`` (None until the first call); a resumed run sets it back."""
        return self._source_ranks

    @source_ranks.setter
    def source_ranks(self, ranks: dict[str, int] | None) -> None:
        self._source_ranks = None if ranks is None else {name: int(rank) for name, rank in ranks.items()}

    def factors(self, model: nn.Module) -> dict[str, float]:
        """``{module: step factor}`` for the modules squeezed below their source rank."""
        records = find_lora_modules(model, self.adapter_name)
        if self._source_ranks is None:
            self._source_ranks = {record.name: record.rank for record in records}
        if self.scaling == "none":
            return {}
        factors = {}
        for record in records:
            now = kept_rank(record.module, record.adapter_name)
            source = self._source_ranks.get(record.name, now)
            if now < source:
                factors[record.name] = _FACTOR[self.scaling](source / now)
        return factors

    def before_step(self, model: nn.Module) -> None:
        """Remember the squeezed modules' factors as they are before the optimizer step."""
        factors = self.factors(model)
        self._before = []
        for record in find_lora_modules(model, self.adapter_name) if factors else ():
            factor = factors.get(record.name)
            if factor is not None:
                for parameter in factor_parameters(record.module, record.adapter_name):
                    self._before.append((parameter, parameter.detach().clone(), factor))

    @torch.no_grad()
    def after_step(self) -> None:
        """Move each remembered factor ``factor`` times as far as the optimizer just moved it."""
        for parameter, before, factor in self._before:
            parameter.sub_(before).mul_(factor).add_(before)
        self._before = []
