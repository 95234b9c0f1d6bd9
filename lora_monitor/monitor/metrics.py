"""Spectral health of a LoRA adapter: per module, for the whole adapter, and over time.

Everything here is a function of singular values, and every singular value comes from the spectrum engine
(:func:`lora_monitor.spectrum.lora_spectra`, one batched call over all modules); this module only turns
spectra into the numbers a person reads:

- :func:`compute_module_metrics`: one :class:`ModuleMetrics` per LoRA pair (effective rank of ΔW, A and B,
  rank utilization, stable rank, κ(A), κ(B), σmax and ‖·‖F of ΔW, dominance over the frozen base weight and
  the update scale ``‖ΔW‖F/‖W‖F``).
- :class:`BaseNormCache`: σmax and ‖·‖F of each frozen base weight, computed once per module.
- :func:`summarize`: mean and worst of each metric for the whole adapter, per module type (attention vs
  MLP) and per layer.
- :func:`gradient_effective_ranks`: the effective rank of the gradient step through each adapter, in
  factored form.
- :class:`MetricsHistory`: trends over checks (rank-utilization trend, steps to saturation, κ volatility).

A module whose ``ΔW`` is exactly zero (``B = 0`` at initialization) is flagged ``is_zero``: its ranks and
condition numbers are undefined (NaN), it is neither healthy nor alarming, and it is left out of means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import _io as serialization
from ..adapters import LoraModule, module_block
from ..spectrum import (
    condition_number_from_singular_values,
    effective_rank,
    lora_spectra,
    spectral_norm,
    stable_rank,
)

NAN = math.nan

# Metrics summarized for the whole adapter, with the direction in which a value is worse.
LOWER_IS_WORSE = (
    "effective_rank",
    "effective_rank_A",
    "effective_rank_B",
    "rank_utilization",
    "stable_rank",
    "gradient_effective_rank",
)
HIGHER_IS_WORSE = ("kappa_A", "kappa_B", "sigma_max", "frobenius", "dominance", "update_scale")
SUMMARIZED_METRICS = LOWER_IS_WORSE + HIGHER_IS_WORSE
# The per-module-type scalars sent to loggers (all metrics per type are in AdapterSummary.by_type).
PER_TYPE_SCALARS = ("effective_rank", "rank_utilization", "dominance")


# --------------------------------------------------------------------------------------------------------
# Per module
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModuleMetrics:
    """Spectral health of one LoRA pair ``ΔW = scale · B @ A`` at one moment.

    Ranks are Roy & Vetterli effective ranks (``exp`` of the entropy of the normalized singular values);
    ``numerical_rank*`` count the singular values the engine resolves as non-zero. ``kappa_*`` is
    ``σmax/σmin`` over the factor's ``r`` singular values, ``inf`` when the factor is rank-deficient.
    ``sigma_max`` and ``frobenius`` are of the scaled delta ``s·B@A``. ``dominance`` is
    ``σmax(s·B@A)/σmax(W_base)`` and ``update_scale`` ``‖s·B@A‖F/‖W_base‖F``: None without a base weight.
    An all-zero delta (``is_zero``) has NaN ranks and condition numbers: undefined, not healthy.
    """

    name: str
    module_type: str
    layer_index: int | None
    is_attention: bool
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

    def to_dict(self, *, json_safe: bool = False) -> dict[str, Any]:
        """The record as a plain dict; ``json_safe`` turns NaN and ±inf into None (strict JSON).

        In JSON a ``kappa`` of None on a non-zero module means ``inf`` (a rank-deficient factor, see
        ``numerical_rank_A``/``numerical_rank_B``).
        """
        record = asdict(self)
        if json_safe:
            record = serialization.json_safe(record)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ModuleMetrics:
        """Inverse of :meth:`to_dict` (None in a float field reads back as NaN, or ``inf`` for a κ)."""
        values = dict(record)
        undefined_when_none = (
            "effective_rank",
            "effective_rank_A",
            "effective_rank_B",
            "rank_utilization",
            "stable_rank",
            "sigma_max",
            "frobenius",
        )
        for key in undefined_when_none:
            values[key] = NAN if values.get(key) is None else values[key]
        for key in ("kappa_A", "kappa_B"):
            if values.get(key) is None:
                values[key] = NAN if values.get("is_zero") else math.inf
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class BaseNorm:
    """σmax and Frobenius norm of one frozen base weight."""

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
    condition numbers up to ~1e7; float32 only up to ~3e3.
    """
    modules = list(modules)
    if not modules:
        return []
    spectra = lora_spectra(
        [module.B for module in modules],
        [module.A for module in modules],
        [module.scale for module in modules],
        dtype=dtype,
    )
    delta, spectra_A, spectra_B = spectra.delta.cpu(), spectra.A.cpu(), spectra.B.cpu()
    results = []
    for index, module in enumerate(modules):
        rank = module.rank
        base = _base_norm(base_norms, module)
        results.append(
            _module_metrics(
                module, delta[index, :rank], spectra_A[index, :rank], spectra_B[index, :rank], base
            )
        )
    return results


def _base_norm(
    base_norms: BaseNormCache | Mapping[str, BaseNorm] | None, module: LoraModule
) -> BaseNorm | None:
    if base_norms is None:
        return None
    if isinstance(base_norms, BaseNormCache):
        return base_norms.get(module)
    return base_norms.get(module.name)


def _module_metrics(
    module: LoraModule, S: torch.Tensor, S_A: torch.Tensor, S_B: torch.Tensor, base: BaseNorm | None
) -> ModuleMetrics:
    sigma_max = float(S[0]) if len(S) else 0.0
    frobenius = float(S.square().sum().sqrt())
    is_zero = sigma_max == 0.0
    if is_zero:
        ranks = (NAN, NAN, NAN, NAN, NAN)
        kappas = (NAN, NAN)
    else:
        rank_delta = float(effective_rank(S))
        ranks = (
            rank_delta,
            float(effective_rank(S_A)),
            float(effective_rank(S_B)),
            rank_delta / module.rank,
            float(stable_rank(S)),
        )
        kappas = (
            float(condition_number_from_singular_values(S_A)),
            float(condition_number_from_singular_values(S_B)),
        )
    dominance = update_scale = None
    if base is not None:
        dominance = sigma_max / base.sigma_max if base.sigma_max > 0 else math.inf
        update_scale = frobenius / base.frobenius if base.frobenius > 0 else math.inf
    return ModuleMetrics(
        name=module.name,
        module_type=module.module_type,
        layer_index=module.layer_index,
        is_attention=module.is_attention,
        kind=module.kind,
        nominal_rank=module.rank,
        alpha=module.alpha,
        scale=module.scale,
        is_zero=is_zero,
        effective_rank=ranks[0],
        effective_rank_A=ranks[1],
        effective_rank_B=ranks[2],
        rank_utilization=ranks[3],
        stable_rank=ranks[4],
        numerical_rank=int((S > 0).sum()),
        numerical_rank_A=int((S_A > 0).sum()),
        numerical_rank_B=int((S_B > 0).sum()),
        kappa_A=kappas[0],
        kappa_B=kappas[1],
        sigma_max=sigma_max,
        frobenius=frobenius,
        base_sigma_max=None if base is None else base.sigma_max,
        base_frobenius=None if base is None else base.frobenius,
        dominance=dominance,
        update_scale=update_scale,
    )


# --------------------------------------------------------------------------------------------------------
# Gradient rank
# --------------------------------------------------------------------------------------------------------


def factor_gradients(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(∇B, ∇A)`` of a live module, shaped like ``B`` and ``A``; None when no gradient is present.

    A missing gradient on one factor (e.g. frozen) counts as zero.
    """
    layer = module.module
    if layer is None:
        return None
    adapter = module.adapter_name
    if module.kind == "embedding":
        A_param, B_param = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        A_param, B_param = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if A_param.grad is None and B_param.grad is None:
        return None
    grad_A = A_param.grad if A_param.grad is not None else torch.zeros_like(A_param)
    grad_B = B_param.grad if B_param.grad is not None else torch.zeros_like(B_param)
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
    step is zero; modules without gradients are left out. float32 is the default: an effective rank does
    not need the resolution a condition number does (directions below 3e-4 of the strongest add < 1e-3).
    """
    names, lefts, rights, scales = [], [], [], []
    for module in modules:
        grads = factor_gradients(module)
        if grads is None:
            continue
        grad_B, grad_A = grads
        B, A = module.B.float(), module.A.float()
        grad_B, grad_A = grad_B.float(), grad_A.float()
        # Gradients are orders of magnitude smaller than the weights: balance the two blocks of the left
        # factor (the product is unchanged) so that the Gram route does not lose the gradient directions
        # below its resolution floor.
        norm_grad_B, norm_B = _norm_or_one(grad_B), _norm_or_one(B)
        lefts.append(torch.cat([grad_B / norm_grad_B, B / norm_B], dim=1))
        rights.append(torch.cat([A * norm_grad_B, grad_A * norm_B], dim=0))
        names.append(module.name)
        scales.append(module.scale)
    if not names:
        return {}
    spectra = lora_spectra(lefts, rights, scales, dtype=dtype).delta.cpu()
    ranks = effective_rank(spectra)
    return {
        name: (float(rank) if float(spectra[index, 0]) > 0 else NAN)
        for index, (name, rank) in enumerate(zip(names, ranks, strict=True))
    }


def _norm_or_one(matrix: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(matrix))
    return norm if norm > 0 and math.isfinite(norm) else 1.0


# --------------------------------------------------------------------------------------------------------
# Whole adapter
# --------------------------------------------------------------------------------------------------------


@dataclass
class MetricSummary:
    """Mean (over modules where the metric is defined and finite) and worst value, with the worst module."""

    mean: float | None
    worst: float | None
    worst_module: str | None
    count: int


@dataclass
class GroupSummary:
    """Summaries of every metric over one group of modules (all, one module type, one layer)."""

    num_modules: int
    num_zero: int
    metrics: dict[str, MetricSummary]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_modules": self.num_modules,
            "num_zero": self.num_zero,
            "metrics": {key: serialization.json_safe(asdict(value)) for key, value in self.metrics.items()},
        }


@dataclass
class AdapterSummary:
    """The whole adapter: ``overall``, ``by_type`` (``"attention"``/``"mlp"``) and ``by_layer``."""

    overall: GroupSummary
    by_type: dict[str, GroupSummary]
    by_layer: dict[int, GroupSummary]

    def scalars(self, prefix: str = "lora/") -> dict[str, float]:
        """Flat scalars for a logger: ``{prefix}mean_<metric>`` and ``{prefix}min_/max_<metric>``
        (min for ranks, max for conditioning, magnitude and dominance), those of effective rank, rank
        utilization and dominance per module type under ``{prefix}attention/`` and ``{prefix}mlp/``, and
        module counts. Undefined and non-finite values (an infinite worst κ) are left out: loggers and
        strict JSON take finite numbers only; :meth:`to_dict` still holds them (``inf`` as null)."""
        scalars: dict[str, float] = {
            f"{prefix}num_modules": float(self.overall.num_modules),
            f"{prefix}num_zero_modules": float(self.overall.num_zero),
        }
        scalars.update(_group_scalars(self.overall, prefix))
        for group_name, group in self.by_type.items():
            scalars.update(_group_scalars(group, f"{prefix}{group_name}/", PER_TYPE_SCALARS))
        return scalars

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "by_type": {key: value.to_dict() for key, value in self.by_type.items()},
            "by_layer": {str(key): value.to_dict() for key, value in self.by_layer.items()},
        }


def _group_scalars(group: GroupSummary, prefix: str, only: Sequence[str] | None = None) -> dict[str, float]:
    scalars = {}
    for metric, summary in group.metrics.items():
        if only is not None and metric not in only:
            continue
        worst_word = "min" if metric in LOWER_IS_WORSE else "max"
        if summary.mean is not None and math.isfinite(summary.mean):
            scalars[f"{prefix}mean_{metric}"] = summary.mean
        if summary.worst is not None and math.isfinite(summary.worst):
            scalars[f"{prefix}{worst_word}_{metric}"] = summary.worst
    return scalars


def _summarize_metric(metrics: Sequence[ModuleMetrics], metric: str) -> MetricSummary:
    values = []
    for record in metrics:
        value = getattr(record, metric)
        if record.is_zero or value is None or math.isnan(value):
            continue
        values.append((value, record.name))
    if not values:
        return MetricSummary(None, None, None, 0)
    finite = [value for value, _ in values if math.isfinite(value)]
    mean = sum(finite) / len(finite) if finite else None
    pick = min if metric in LOWER_IS_WORSE else max
    worst, worst_module = pick(values, key=lambda item: item[0])
    return MetricSummary(mean, worst, worst_module, len(values))


def _group(metrics: Sequence[ModuleMetrics]) -> GroupSummary:
    return GroupSummary(
        num_modules=len(metrics),
        num_zero=sum(record.is_zero for record in metrics),
        metrics={metric: _summarize_metric(metrics, metric) for metric in SUMMARIZED_METRICS},
    )


def summarize(metrics: Sequence[ModuleMetrics]) -> AdapterSummary:
    """Mean and worst of every metric for the whole adapter, per module type and per layer.

    Zero modules and undefined values are left out of means and worsts; the mean of a condition number
    is over the finite ones (the worst may be ``inf``).
    """
    by_type: dict[str, list[ModuleMetrics]] = {}
    by_layer: dict[int, list[ModuleMetrics]] = {}
    for record in metrics:
        by_type.setdefault(module_block(record.name), []).append(record)
        if record.layer_index is not None:
            by_layer.setdefault(record.layer_index, []).append(record)
    return AdapterSummary(
        overall=_group(metrics),
        by_type={key: _group(value) for key, value in sorted(by_type.items())},
        by_layer={key: _group(value) for key, value in sorted(by_layer.items())},
    )


# --------------------------------------------------------------------------------------------------------
# Over time
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModuleDynamics:
    """How one module has evolved over the checks so far.

    ``trend`` of the rank utilization over the last ``window`` checks: ``"increasing"``, ``"stable"`` or
    ``"collapsing"`` (None with fewer than two non-zero checks). ``saturated_since``: the step from which
    the effective rank has stayed within the tolerance (None if it has not for ``saturation_checks``
    checks); ``steps_to_saturation`` counts steps from the first non-zero check to it. ``kappa_*_volatility``
    is the standard deviation of ``log10 κ`` over the window (orders of magnitude; None without two finite
    values). Trend, saturation and volatility use only the checks at the module's current nominal rank (a
    module resized during training starts over); ``checks`` counts every non-zero check.
    ``gradient_effective_rank`` is the latest one.
    """

    name: str
    checks: int
    trend: str | None
    rank_utilization_change: float | None
    saturated_since: int | None
    steps_to_saturation: int | None
    kappa_A_volatility: float | None
    kappa_B_volatility: float | None
    gradient_effective_rank: float | None

    def to_dict(self) -> dict[str, Any]:
        return serialization.json_safe(asdict(self))


@dataclass
class MetricsHistory:
    """The per-module metrics of every check, and the dynamics derived from them.

    ``trend_tolerance``: relative change of rank utilization over the window that counts as a trend.
    ``saturation_tolerance``: relative spread of effective rank that counts as unchanged, for
    ``saturation_checks`` consecutive checks.
    """

    window: int = 5
    trend_tolerance: float = 0.1
    saturation_tolerance: float = 0.02
    saturation_checks: int = 5
    steps: list[int] = field(default_factory=list)
    records: dict[str, list[tuple[int, ModuleMetrics]]] = field(default_factory=dict)

    def add(self, step: int, metrics: Iterable[ModuleMetrics]) -> None:
        """Record one check (a second check at the same step replaces the first)."""
        if self.steps and self.steps[-1] == step:
            for series in self.records.values():
                if series and series[-1][0] == step:
                    series.pop()
        else:
            self.steps.append(step)
        for record in metrics:
            self.records.setdefault(record.name, []).append((step, record))

    def series(
        self, name: str, metric: str = "effective_rank", *, nominal_rank: int | None = None
    ) -> list[tuple[int, float]]:
        """``(step, value)`` of one metric of one module over the checks where ΔW was non-zero.

        ``nominal_rank`` keeps only the checks made at that rank (a module resized during training, by
        In-Squeeze for instance, starts a new series: its drop in rank is a decision, not a collapse).
        """
        return [
            (step, getattr(record, metric))
            for step, record in self.records.get(name, [])
            if not record.is_zero
            and getattr(record, metric) is not None
            and (nominal_rank is None or record.nominal_rank == nominal_rank)
        ]

    def latest_rank(self, name: str) -> int | None:
        """The nominal rank of module ``name`` at its latest check (None if it was never checked)."""
        series = self.records.get(name)
        return series[-1][1].nominal_rank if series else None

    def current_series(self, name: str, metric: str = "effective_rank") -> list[tuple[int, float]]:
        """:meth:`series` over the checks made at the module's latest nominal rank only.

        The dynamics (trend, saturation, κ volatility) are of this series: after a resize the module's
        earlier checks at another rank are another adapter, and comparing with them would show a trend
        (or a plateau) that training did not make.
        """
        return self.series(name, metric, nominal_rank=self.latest_rank(name))

    def trend(self, name: str) -> tuple[str | None, float | None]:
        """Trend of rank utilization over the last ``window`` non-zero checks at the current rank, and its
        relative change."""
        points = self.current_series(name, "rank_utilization")[-self.window :]
        if len(points) < 2:
            return None, None
        change = _fitted_relative_change(points)
        if change is None:
            return None, None
        if change > self.trend_tolerance:
            return "increasing", change
        if change < -self.trend_tolerance:
            return "collapsing", change
        return "stable", change

    def saturated_since(
        self, name: str, *, tolerance: float | None = None, checks: int | None = None
    ) -> int | None:
        """First step of the current run of ≥ ``checks`` checks (at the current rank) with an unchanged
        effective rank: one whose spread ``max − min`` is at most ``tolerance × max |value|``.

        ``tolerance`` and ``checks`` default to ``saturation_tolerance`` and ``saturation_checks``; the alert
        rule passes its own thresholds. None while the effective rank has not stayed that long.
        """
        tolerance = self.saturation_tolerance if tolerance is None else tolerance
        checks = self.saturation_checks if checks is None else checks
        points = self.current_series(name)
        if not points or len(points) < checks:
            return None
        start = len(points) - 1
        while start > 0:
            values = [value for _, value in points[start - 1 :]]
            if not _within(values, tolerance):
                break
            start -= 1
        if len(points) - start < checks:
            return None
        return points[start][0]

    def kappa_volatility(self, name: str, factor: str) -> float | None:
        """Standard deviation of ``log10 κ`` of factor ``"A"`` or ``"B"`` over the last ``window`` checks at
        the current rank (None without two finite values)."""
        values = [
            math.log10(value)
            for _, value in self.current_series(name, f"kappa_{factor}")[-self.window :]
            if math.isfinite(value) and value > 0
        ]
        return statistics.pstdev(values) if len(values) >= 2 else None

    def dynamics(self, name: str) -> ModuleDynamics:
        """Everything :class:`ModuleDynamics` holds for module ``name``."""
        points = self.series(name)
        trend, change = self.trend(name)
        since = self.saturated_since(name)
        latest = self.records.get(name, [])
        gradient_rank = latest[-1][1].gradient_effective_rank if latest else None
        return ModuleDynamics(
            name=name,
            checks=len(points),
            trend=trend,
            rank_utilization_change=change,
            saturated_since=since,
            steps_to_saturation=None if since is None else since - points[0][0],
            kappa_A_volatility=self.kappa_volatility(name, "A"),
            kappa_B_volatility=self.kappa_volatility(name, "B"),
            gradient_effective_rank=gradient_rank,
        )

    def all_dynamics(self) -> list[ModuleDynamics]:
        return [self.dynamics(name) for name in self.records]


def _within(values: Sequence[float], tolerance: float) -> bool:
    """Unchanged within ``tolerance``: all finite, and ``max − min ≤ tolerance × max |value|``."""
    finite = [value for value in values if math.isfinite(value)]
    if len(finite) != len(values):
        return False
    scale = max(abs(value) for value in finite)
    return (max(finite) - min(finite)) <= tolerance * scale


def _fitted_relative_change(points: Sequence[tuple[int, float]]) -> float | None:
    """Change of a least-squares line over the points' step range, relative to their mean."""
    steps = [float(step) for step, _ in points]
    values = [value for _, value in points]
    if not all(math.isfinite(value) for value in values):
        return None
    mean_step, mean_value = sum(steps) / len(steps), sum(values) / len(values)
    spread = sum((step - mean_step) ** 2 for step in steps)
    if spread == 0 or mean_value == 0:
        return None
    slope = sum((s - mean_step) * (v - mean_value) for s, v in zip(steps, values, strict=True)) / spread
    return slope * (steps[-1] - steps[0]) / abs(mean_value)


def dynamics_scalars(dynamics: Sequence[ModuleDynamics], prefix: str = "lora/") -> dict[str, float]:
    """Counts of modules per trend and saturated, mean κ volatility and mean gradient effective rank."""
    scalars = {
        f"{prefix}num_collapsing_modules": float(sum(d.trend == "collapsing" for d in dynamics)),
        f"{prefix}num_increasing_modules": float(sum(d.trend == "increasing" for d in dynamics)),
        f"{prefix}num_saturated_modules": float(sum(d.saturated_since is not None for d in dynamics)),
    }
    for key in ("kappa_A_volatility", "kappa_B_volatility"):
        values = [getattr(d, key) for d in dynamics if getattr(d, key) is not None]
        if values:
            scalars[f"{prefix}mean_{key}"] = sum(values) / len(values)
    return scalars
