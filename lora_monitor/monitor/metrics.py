"""Spectral health of each LoRA pair, at one moment.

Everything here is a function of singular values, and every singular value comes from the spectrum engine
(:func:`lora_monitor.spectrum.lora_spectra`, one batched call over all modules); this module only turns
spectra into the numbers a person reads:

- :func:`compute_module_metrics`: one :class:`ModuleMetrics` per LoRA pair (effective rank of ΔW, A and B,
  rank utilization, stable rank, κ(A), κ(B), σmax and ‖·‖F of ΔW, dominance over the frozen base weight and
  the update scale ``‖ΔW‖F/‖W‖F``).
- :class:`BaseNormCache`: σmax and ‖·‖F of each frozen base weight, computed once per module.
- :func:`~lora_monitor.monitor.gradients.gradient_effective_ranks` (in :mod:`.gradients`): the effective
  rank of the gradient step through each adapter, in factored form.

The whole adapter's summary is in :mod:`.summary`, the history over checks in :mod:`.history`.

A module whose ``ΔW`` is exactly zero (``B = 0`` at initialization) is flagged ``is_zero``: its ranks and
condition numbers are undefined (NaN), it is neither healthy nor alarming, and it is left out of means.
A module with NaN or Inf in a factor (diverged training) is flagged ``non_finite``: every metric is NaN,
the other modules are measured as usual, and nothing is raised (a monitor never stops training). A module
whose frozen base weight holds NaN or Inf is flagged ``non_finite_base``: its dominance and update scale are
NaN, its factors are measured as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import _io
from ..adapters import LoraModule, module_block
from ..spectrum import (
    condition_number_from_singular_values,
    effective_rank,
    lora_spectra,
    spectral_norm,
    stable_rank,
)

NAN = math.nan


@dataclass
class ModuleMetrics:
    """Spectral health of one LoRA pair ``ΔW = scale · B @ A`` at one moment.

    Ranks are Roy & Vetterli effective ranks (``exp`` of the entropy of the normalized singular values);
    ``numerical_rank*`` count the singular values the engine resolves as non-zero. ``kappa_*`` is
    ``σmax/σmin`` over the factor's ``r`` singular values, ``inf`` when the factor is rank-deficient.
    ``sigma_max`` and ``frobenius`` are of the scaled delta ``s·B@A``. ``dominance`` is
    ``σmax(s·B@A)/σmax(W_base)`` and ``update_scale`` ``‖s·B@A‖F/‖W_base‖F``: None without a base weight.
    ``block`` is ``"attention"``, ``"mlp"`` or ``"other"`` (embeddings, ``lm_head``: see
    :func:`~lora_monitor.adapters.module_block`).
    An all-zero delta (``is_zero``) has NaN ranks and condition numbers: undefined, not healthy. A pair
    with NaN/Inf factors (``non_finite``) has NaN everywhere. A pair over a base weight with NaN/Inf
    (``non_finite_base``) has a NaN dominance and update scale (and NaN base norms).

    Filled in by :class:`~lora_monitor.monitor.check.Monitor` on a live model: ``unchanged_since``, the
    step of the first check from which the factors have stayed bit-identical (None once they changed), and
    ``frozen_reason``, why the pair cannot train where that is visible (``"requires_grad is off"``,
    ``"learning rate 0"``, ``"not in the optimizer"``), else None.
    """

    name: str
    module_type: str
    layer_index: int | None
    block: str
    kind: str
    nominal_rank: int
    alpha: float
    scale: float
    is_zero: bool
    effective_rank: float
    effective_rank_A: float
    effective_rank_B: float
    rank_utilization: float
    stable_rank: float
    numerical_rank: int
    numerical_rank_A: int
    numerical_rank_B: int
    kappa_A: float
    kappa_B: float
    sigma_max: float
    frobenius: float
    base_sigma_max: float | None = None
    base_frobenius: float | None = None
    dominance: float | None = None
    update_scale: float | None = None
    gradient_effective_rank: float | None = None
    non_finite: bool = False
    non_finite_base: bool = False
    unchanged_since: int | None = None
    frozen_reason: str | None = None
    # Rows of B exactly zero, as a fraction of its rows: 1 for a zero B (its initialization), 0 once it trains;
    # anything between is an adapter half restored from a sharded checkpoint (see monitor.rules). NaN when
    # the factors are not finite.
    zero_row_fraction_B: float = 0.0
    intruder_dimensions: int | None = None  # at checks that count them (Monitor(intruders_every=...))

    @property
    def is_attention(self) -> bool:
        """True for attention projections (``block == "attention"``)."""
        return self.block == "attention"

    def to_dict(self, *, json_safe: bool = False) -> dict[str, Any]:
        """The record as a plain dict; ``json_safe`` turns NaN and ±inf into None (strict JSON).

        In JSON a ``kappa`` of None on a non-zero, finite module means ``inf`` (a rank-deficient factor, see
        ``numerical_rank_A``/``numerical_rank_B``).
        """
        record = _io.plain_fields(self)
        if json_safe:
            record = _io.json_safe(record)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ModuleMetrics:
        """Inverse of :meth:`to_dict` (None in a float field reads back as NaN, or ``inf`` for a κ)."""
        values = dict(record)
        values.setdefault("block", module_block(values["name"]))  # lines written before `block` existed
        undefined_when_none = (
            "effective_rank",
            "effective_rank_A",
            "effective_rank_B",
            "rank_utilization",
            "stable_rank",
            "sigma_max",
            "frobenius",
            "zero_row_fraction_B",
        )
        for key in undefined_when_none:
            values[key] = NAN if values.get(key) is None else values[key]
        for key in ("kappa_A", "kappa_B"):
            if values.get(key) is None:
                undefined = values.get("is_zero") or values.get("non_finite")
                values[key] = NAN if undefined else math.inf
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class BaseNorm:
    """σmax and Frobenius norm of one frozen base weight (both NaN when the weight holds NaN or Inf)."""

    sigma_max: float
    frobenius: float


class BaseNormCache:
    """σmax(W_base) and ‖W_base‖F per module, computed once and kept (the base is frozen).

    σmax comes from :func:`lora_monitor.spectrum.spectral_norm` (a few power iterations, no full SVD) on
    the dequantized weight (``LoraModule.base_weight()`` dequantizes 4-bit and 8-bit bases through PEFT).
    For a saved adapter, give ``weight_for``: a function from module name to the base weight (or None).
    """

    def __init__(
        self,
        weight_for: Callable[[str], torch.Tensor | None] | None = None,
        *,
        power_iterations: int = 8,
    ) -> None:
        self._weight_for = weight_for
        self._power_iterations = power_iterations
        self._norms: dict[str, BaseNorm | None] = {}

    def __len__(self) -> int:
        return len(self._norms)

    def __contains__(self, name: object) -> bool:
        return name in self._norms

    def get(self, module: LoraModule) -> BaseNorm | None:
        """The base norms of ``module``'s frozen weight (computed on first use), or None if it has none."""
        if module.name not in self._norms:
            weight = self._weight_for(module.name) if self._weight_for else module.base_weight()
            self._norms[module.name] = None if weight is None else self._measure(weight)
        return self._norms[module.name]

    def _measure(self, weight: torch.Tensor) -> BaseNorm:
        weight = weight.detach()
        if weight.dim() > 2:
            weight = weight.reshape(weight.shape[0], -1)
        if not weight.is_floating_point():
            raise ValueError(f"base weight of dtype {weight.dtype} must be dequantized first")
        if not bool(torch.isfinite(weight).all()):
            # A broken base (a bad checkpoint or dequantization): undefined norms, alerted as non_finite; the
            # power iteration would fail on it and take the whole check down with it. One pass, once.
            return BaseNorm(sigma_max=NAN, frobenius=NAN)
        sigma = spectral_norm(weight, iters=self._power_iterations)
        frobenius = float(torch.linalg.vector_norm(weight.float(), dtype=torch.float64))
        return BaseNorm(sigma_max=sigma, frobenius=frobenius)


def compute_module_metrics(
    modules: Sequence[LoraModule],
    base_norms: BaseNormCache | Mapping[str, BaseNorm] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> list[ModuleMetrics]:
    """:class:`ModuleMetrics` for each LoRA pair, from one batched :func:`lora_spectra` call.

    ``base_norms`` (a :class:`BaseNormCache`, or a mapping from module name to :class:`BaseNorm`) enables
    dominance and update scale; without it they are None. ``dtype=torch.float64`` (the default) resolves
    condition numbers up to ~1e7; float32 only up to ~3e3. A pair with NaN/Inf factors gets a
    ``non_finite`` record instead of an exception.
    """
    modules = list(modules)
    if not modules:
        return []
    summaries = _finite_summaries(modules, dtype)
    results = []
    for module in modules:
        found = summaries.get(module.name)
        if found is None:
            results.append(_non_finite_metrics(module))
            continue
        results.append(_module_metrics(module, found, _base_norm(base_norms, module)))
    return results


# What one pass over a batch of spectra gives each module, in this order (see _summaries).
_SUMMARY = (
    "sigma_max",
    "frobenius",
    "effective_rank",
    "effective_rank_A",
    "effective_rank_B",
    "stable_rank",
    "kappa_A",
    "kappa_B",
    "numerical_rank",
    "numerical_rank_A",
    "numerical_rank_B",
    "zero_row_fraction_B",
)


def _finite_summaries(modules: Sequence[LoraModule], dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """``name -> {summary: value}`` for every module whose spectrum is finite.

    NaN/Inf in one factor makes the batched eigensolver refuse the whole batch (or return non-finite
    values): only then are the factors scanned, and the decomposition redone without the broken ones
    (a scan up front would cost a pass over every factor at every check).
    """
    factors = [(module.B, module.A) for module in modules]
    try:
        found = _summaries(modules, factors, dtype)
    except (torch.linalg.LinAlgError, RuntimeError):
        found = None
    if found is not None and len(found) == len(modules):
        return found
    healthy = [
        index
        for index, (B, A) in enumerate(factors)
        if bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())
    ]
    if found is not None and len(healthy) == len(modules):
        return found  # finite factors whose spectrum overflowed: those modules are non-finite
    if not healthy:
        return {}
    return _summaries([modules[i] for i in healthy], [factors[i] for i in healthy], dtype)


def _summaries(modules, factors, dtype) -> dict[str, dict[str, float]]:
    """Every per-module number of one batch of spectra, computed on the whole batch at once and read back
    in one transfer: with hundreds of modules per check, per-module tensor calls would cost more than the
    decompositions."""
    spectra = lora_spectra(
        [B for B, _ in factors], [A for _, A in factors], [module.scale for module in modules], dtype=dtype
    )
    delta, values_A, values_B = spectra.delta, spectra.A, spectra.B  # (N, r_max), descending, zero-padded
    ranks = torch.tensor([module.rank for module in modules], device=delta.device)
    within_rank = torch.arange(delta.shape[1], device=delta.device) < ranks.unsqueeze(1)
    # The three spectra in one stack: each summary of all three is one call (fewer calls per check).
    spectra_stack = torch.stack([delta, values_A, values_B])  # (3, N, r_max)
    table = torch.cat(
        [
            torch.stack([delta[:, 0], delta.square().sum(-1).sqrt()]),
            effective_rank(spectra_stack),  # of ΔW, A and B
            stable_rank(delta).unsqueeze(0),
            condition_number_from_singular_values(spectra_stack[1:], within_rank),  # of A and B
            (spectra_stack > 0).sum(-1).double(),  # numerical ranks of ΔW, A and B
            torch.stack([_zero_row_fraction(B).to(delta.device) for B, _ in factors]).unsqueeze(0),
        ]
    ).T  # (N, len(_SUMMARY)), in _SUMMARY's order
    finite = torch.isfinite(spectra_stack).all(-1).all(0)
    return {
        module.name: dict(zip(_SUMMARY, row, strict=True))
        for module, row, ok in zip(modules, table.cpu().tolist(), finite.cpu().tolist(), strict=True)
        if ok
    }


def _zero_row_fraction(B: torch.Tensor) -> torch.Tensor:
    """The fraction of ``B``'s rows (output features) that are exactly zero, as a float64 scalar tensor on
    ``B``'s device (no read-back: it travels with the other summaries)."""
    rows = B.detach().reshape(B.shape[0], -1)
    return (rows == 0).all(dim=1).sum(dtype=torch.float64) / rows.shape[0]


def _base_norm(
    base_norms: BaseNormCache | Mapping[str, BaseNorm] | None, module: LoraModule
) -> BaseNorm | None:
    if base_norms is None:
        return None
    if isinstance(base_norms, BaseNormCache):
        return base_norms.get(module)
    return base_norms.get(module.name)


def _identity(module: LoraModule) -> dict[str, Any]:
    return dict(
        name=module.name,
        module_type=module.module_type,
        layer_index=module.layer_index,
        block=module.block,
        kind=module.kind,
        nominal_rank=module.rank,
        alpha=module.alpha,
        scale=module.scale,
    )


def _non_finite_metrics(module: LoraModule) -> ModuleMetrics:
    """The record of a pair whose factors (or spectrum) hold NaN/Inf: every metric undefined."""
    undefined = dict.fromkeys(
        ("effective_rank", "effective_rank_A", "effective_rank_B", "rank_utilization", "stable_rank"), NAN
    )
    return ModuleMetrics(
        **_identity(module),
        is_zero=False,
        **undefined,
        numerical_rank=0,
        numerical_rank_A=0,
        numerical_rank_B=0,
        kappa_A=NAN,
        kappa_B=NAN,
        sigma_max=NAN,
        frobenius=NAN,
        non_finite=True,
        zero_row_fraction_B=NAN,
    )


def _module_metrics(module: LoraModule, summary: Mapping[str, float], base: BaseNorm | None) -> ModuleMetrics:
    sigma_max, frobenius = summary["sigma_max"], summary["frobenius"]
    is_zero = sigma_max == 0.0
    undefined_when_zero = ("effective_rank", "effective_rank_A", "effective_rank_B", "stable_rank")
    values = {key: NAN if is_zero else summary[key] for key in undefined_when_zero}
    values["rank_utilization"] = values["effective_rank"] / module.rank
    values |= {key: NAN if is_zero else summary[key] for key in ("kappa_A", "kappa_B")}
    dominance = update_scale = None
    base_broken = base is not None and not (math.isfinite(base.sigma_max) and math.isfinite(base.frobenius))
    if base_broken:
        dominance = update_scale = NAN
    elif base is not None:
        dominance = sigma_max / base.sigma_max if base.sigma_max > 0 else math.inf
        update_scale = frobenius / base.frobenius if base.frobenius > 0 else math.inf
    return ModuleMetrics(
        **_identity(module),
        is_zero=is_zero,
        **values,
        numerical_rank=int(summary["numerical_rank"]),
        numerical_rank_A=int(summary["numerical_rank_A"]),
        numerical_rank_B=int(summary["numerical_rank_B"]),
        sigma_max=sigma_max,
        frobenius=frobenius,
        base_sigma_max=None if base is None else base.sigma_max,
        base_frobenius=None if base is None else base.frobenius,
        dominance=dominance,
        update_scale=update_scale,
        non_finite_base=base_broken,
        zero_row_fraction_B=summary["zero_row_fraction_B"],
    )
