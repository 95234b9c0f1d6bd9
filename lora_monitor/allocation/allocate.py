"""Rank before training: per-layer LoRA ranks from the base model's weight spectra, and a gradient probe.

Heavy-tailed self-regularization (HT-SR) reads how much structure training has already put into a weight
matrix from the eigenvalues ``λ = σ²`` of ``WᵀW`` (its empirical spectral density, ESD):

- the **power-law exponent α** of the ESD's tail (Hill estimator): a small α (heavy tail) marks a layer
  with much learned structure, a large α one that is closer to random;
- the **spikes**: eigenvalues above the Marchenko-Pastur (MP) bulk edge ``λ+ = σ²(1 + 1/√Q)²`` of a random
  matrix of the same shape (``Q = N/M ≥ 1``), widened by the Tracy-Widom fluctuation of the edge.

The definitions follow WeightWatcher 0.7.7 (``weightwatcher.py``/``WW_powerlaw.py``/``RMT_Util.py``) so the
numbers can be compared with it; the tests do. What differs is how they are computed: every eigenvalue
comes from one batched dense SVD (:func:`lora_monitor.spectrum.weight_singular_values`, on the GPU when
there is one), the KS scan over every candidate ``xmin`` is one vectorized O(M²) tensor computation rather
than a Python loop, and the MP fit evaluates its kernel density once per layer rather than once per trial σ.

:func:`allocate_ranks` turns the two metrics into a ``rank_pattern``/``alpha_pattern`` for PEFT, following
Adaptive-Rank LoRA (Paila et al., 2024). :func:`probe_rank` instead looks at the data: the singular values of
the loss gradient with respect to each target weight, accumulated over a few batches before training.

This module only works on eigenvalues; the one SVD call lives in ``spectrum.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._io import json_number
from ..adapters import describe_module, pattern_key
from ..errors import LoraMonitorError
from ..spectrum import energy_curve, rank_for_energy, weight_singular_values

Tensor = torch.Tensor

# WeightWatcher's constants, kept identical so that fits are comparable.
EVALS_THRESHOLD = 1e-5  # eigenvalues at or below this are left out of the power-law fit (EVALS_THRESH)
SMALL_SAMPLE = 20  # below this many eigenvalues WeightWatcher uses its bias-corrected small-sample fit
SMALL_SAMPLE_MIN_TAIL = 8  # ... whose tails have at least this many eigenvalues
KDE_BANDWIDTH = 0.1  # linear-kernel density estimate of the rescaled ESD (MP fit)
KDE_POINTS = 1000
DENSITY_FLOOR = 0.01  # grid points where the density estimate is below this are left out of the MP fit
# A rejected MP fit (edge outside the ESD) costs 1000 per grid point, squared, as in WeightWatcher.
REJECTED_RESIDUAL = 1000.0

FitRule = Literal["median", "ks"]
Scaling = Literal["linear", "log", "sqrt"]


# --------------------------------------------------------------------------------------------------------
# Power-law fit of the tail (Hill estimator)
# --------------------------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """A power law ``p(λ) ∝ λ^-α`` fitted to the eigenvalues ``λ ≥ xmin``.

    ``ks_distance`` is the Kolmogorov-Smirnov distance between the fitted and the empirical tail,
    ``tail_size`` the number of eigenvalues in the tail, ``sigma`` the standard error ``(α-1)/√n``.
    All NaN (``tail_size`` 0) when there are fewer than two usable eigenvalues.
    """

    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int
    sigma: float


def _ks_distances(sorted_values: Tensor, log_values: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
    """KS distance of the power law with exponent ``alphas[k]`` on the tail starting at ``starts[k]``.

    Vectorized over the candidates: one ``(candidates × N)`` block at a time, masked to each tail.
    """
    count = sorted_values.shape[0]
    positions = torch.arange(count, device=sorted_values.device)
    # Keep each block at about 4M float64 entries whatever the spectrum's size.
    block = max(1, (1 << 22) // max(1, count))
    out = torch.empty(starts.shape[0], dtype=torch.float64, device=sorted_values.device)
    for begin in range(0, starts.shape[0], block):
        start = starts[begin : begin + block]
        alpha = alphas[begin : begin + block]
        tail_length = (count - start).to(torch.float64)
        in_tail = positions.unsqueeze(0) >= start.unsqueeze(1)
        ratio = sorted_values.unsqueeze(0) / sorted_values[start].unsqueeze(1)
        fitted_cdf = 1 - torch.pow(ratio, 1 - alpha.unsqueeze(1))
        empirical_cdf = (positions.unsqueeze(0) - start.unsqueeze(1)).to(
            torch.float64
        ) / tail_length.unsqueeze(1)
        gap = torch.where(in_tail, (fitted_cdf - empirical_cdf).abs(), torch.zeros_like(fitted_cdf))
        out[begin : begin + block] = gap.amax(dim=1)
    return out


def fit_power_law(eigenvalues: Tensor, fit: FitRule = "median") -> PowerLawFit:
    """Hill power-law fit of the tail of an ESD, with ``xmin`` by the median rule or by a KS scan.

    Only eigenvalues above ``1e-5`` take part (WeightWatcher's threshold). ``fit="median"`` puts ``xmin`` at the
    median eigenvalue (the tail is the upper half; the Adaptive-Rank-LoRA/AlphaPruning rule) and gives
    ``α = 1 + n / Σ ln(λᵢ/xmin)``. ``fit="ks"`` tries every eigenvalue as ``xmin`` and keeps the one whose fit
    is closest to the data in KS distance, as WeightWatcher's default fit does (including its bias-corrected
    small-sample variant below 20 eigenvalues).
    """
    if fit not in ("median", "ks"):
        raise LoraMonitorError(f"unknown power-law fit rule {fit!r}: use 'median' or 'ks'")
    values = torch.sort(eigenvalues.detach().to(device="cpu", dtype=torch.float64).flatten()).values
    values = values[values > EVALS_THRESHOLD]
    count = values.shape[0]
    if count < 2:
        return PowerLawFit(math.nan, math.nan, math.nan, 0, math.nan)
    logs = values.log()
    # suffix[i] = Σ_{j ≥ i} ln λ_j, so Σ ln(λ_j/λ_i) over the tail is suffix[i] - n_i ln λ_i.
    suffix = logs.flip(0).cumsum(0).flip(0)
    if fit == "median":
        start = torch.tensor([count // 2])
        n = float(count - count // 2)
        alpha = 1 + n / (suffix[start] - n * logs[start])
        distance = _ks_distances(values, logs, start, alpha)
        return _result(values, int(start), alpha, distance)
    starts = torch.arange(count - 1)
    tail_length = (count - starts).to(torch.float64)
    log_excess = suffix[:-1] - tail_length * logs[:-1]
    if count >= SMALL_SAMPLE:
        alphas = 1 + tail_length / log_excess
        distances = _ks_distances(values, logs, starts, alphas)
        distances = torch.where(alphas > 1, distances, torch.ones_like(distances))
        best = int(torch.argmin(distances))  # the first of equal minima, as numpy's argmin
        return _result(values, best, alphas[best : best + 1], distances[best : best + 1])
    # Few eigenvalues: bias-corrected α = 1 + (n-1)/Σ ln(λ/xmin), tails of at least 8, and xmin chosen by
    # KS distance minus 0.868/√n so that the tail is not made needlessly short.
    usable = (tail_length >= SMALL_SAMPLE_MIN_TAIL) & (log_excess > 1e-12)
    alphas = torch.where(usable, 1 + (tail_length - 1) / log_excess, torch.zeros_like(log_excess))
    usable &= alphas > 1
    distances = _ks_distances(values, logs, starts, torch.where(usable, alphas, torch.full_like(alphas, 2.0)))
    objective = torch.where(
        usable, distances - 0.868 / tail_length.sqrt(), torch.full_like(distances, math.inf)
    )
    if bool(usable.any()):
        best = int(torch.argmin(objective))
        return _result(values, best, alphas[best : best + 1], distances[best : best + 1])
    if float(log_excess[0]) <= 1e-12:
        return PowerLawFit(1.0, float(values[0]), 1.0, count, 0.0)
    alpha = 1 + (tail_length[:1] - 1) / log_excess[:1]
    distance = _ks_distances(values, logs, starts[:1], alpha)
    return _result(values, 0, alpha, distance)


def _result(values: Tensor, start: int, alpha: Tensor, distance: Tensor) -> PowerLawFit:
    tail = values.shape[0] - start
    a = float(alpha.reshape(-1)[0])
    return PowerLawFit(
        a, float(values[start]), float(distance.reshape(-1)[0]), tail, (a - 1) / math.sqrt(tail)
    )


# --------------------------------------------------------------------------------------------------------
# Marchenko-Pastur bulk and its spikes
# --------------------------------------------------------------------------------------------------------


@dataclass
class BulkFit:
    """The Marchenko-Pastur bulk fitted to an ESD, and the eigenvalues that stand out of it.

    ``sigma_mp`` is the fitted σ of the ESD rescaled to mean eigenvalue 1 (WeightWatcher's ``sigma_mp``);
    ``bulk_max``/``bulk_min`` are the MP edges ``σ²(1 ± 1/√Q)²`` and ``edge`` the upper edge plus the
    Tracy-Widom allowance ``√(Q^-½ λ+^⅔ M^-⅔)``, all in the units of the input eigenvalues. ``num_spikes``
    counts the eigenvalues above ``edge``; ``mp_softrank`` is ``λ+/λmax``.
    """

    sigma_mp: float
    bulk_max: float
    bulk_min: float
    edge: float
    num_spikes: int
    mp_softrank: float


def _density_estimate(points: Tensor) -> tuple[Tensor, Tensor]:
    """Linear-kernel density estimate on a 1000-point grid from 0 to ``max + 0.5`` (sklearn's ``linear``)."""
    grid = torch.linspace(0, float(points.max()) + 0.5, KDE_POINTS, dtype=torch.float64)
    block = max(1, (1 << 22) // max(1, points.shape[0]))
    density = torch.empty_like(grid)
    for begin in range(0, KDE_POINTS, block):
        distance = (grid[begin : begin + block].unsqueeze(1) - points.unsqueeze(0)).abs()
        density[begin : begin + block] = (1 - distance / KDE_BANDWIDTH).clamp_min(0).sum(1)
    return grid, density / (points.shape[0] * KDE_BANDWIDTH)


class _BulkMisfit:
    """Squared misfit between the MP (or, for square matrices, quarter-circle) law of width σ and the ESD."""

    def __init__(self, points: Tensor, aspect_ratio: float) -> None:
        grid, density = _density_estimate(points)
        kept = density > DENSITY_FLOOR
        self.x = grid[kept]
        self.y = density[kept]
        self.q = aspect_ratio
        self.peak = float(self.x[torch.argmax(self.y)]) if self.x.numel() else 0.0
        self.right = float(self.x.max()) if self.x.numel() else 0.0

    def __call__(self, sigma: float) -> float:
        return float(self.many(torch.tensor([sigma], dtype=torch.float64))[0])

    def many(self, sigmas: Tensor) -> Tensor:
        """The misfit for each of ``sigmas`` at once."""
        sigma = sigmas.to(torch.float64).unsqueeze(1)
        x = self.x.unsqueeze(0)
        if self.q == 1:
            law = torch.sqrt(4 - x**2) / (math.pi * sigma * sigma)
            rejected = torch.zeros(sigmas.shape[0], dtype=torch.bool)
        else:
            upper = (sigma * (1 + math.sqrt(1 / self.q))) ** 2
            lower = (sigma * (1 - math.sqrt(1 / self.q))) ** 2
            law = torch.sqrt((upper - x) * (x - lower)) / (2 * math.pi * sigma * sigma * x / self.q)
            # An edge left of the density's peak or past its support is no fit at all.
            rejected = ((upper < self.peak) | (upper > self.right) | (lower > self.peak)).squeeze(1)
        misfit = ((torch.nan_to_num(law) - self.y) ** 2).sum(1)
        return torch.where(rejected, torch.full_like(misfit, REJECTED_RESIDUAL**2 * self.x.numel()), misfit)


def _nelder_mead_1d(
    objective, x0: float, xtol: float = 1e-4, ftol: float = 1e-4, max_calls: int = 200
) -> float:
    """SciPy's ``fmin`` (Nelder-Mead with its default coefficients and start simplex) in one dimension."""
    calls = 0

    def evaluate(x: float) -> float:
        nonlocal calls
        calls += 1
        return objective(x)

    simplex = [x0, 1.05 * x0 if x0 != 0 else 0.00025]
    values = [evaluate(simplex[0]), evaluate(simplex[1])]
    if values[1] < values[0]:
        simplex.reverse()
        values.reverse()
    for _ in range(1, max_calls):
        if abs(simplex[1] - simplex[0]) <= xtol and abs(values[0] - values[1]) <= ftol:
            break
        if calls >= max_calls:
            break
        best, worst = simplex
        reflected = 2 * best - worst
        f_reflected = evaluate(reflected)
        shrink = False
        if f_reflected < values[0]:
            expanded = 3 * best - 2 * worst
            f_expanded = evaluate(expanded)
            simplex[1], values[1] = (
                (expanded, f_expanded) if f_expanded < f_reflected else (reflected, f_reflected)
            )
        elif f_reflected < values[1]:
            contracted = 1.5 * best - 0.5 * worst
            f_contracted = evaluate(contracted)
            if f_contracted <= f_reflected:
                simplex[1], values[1] = contracted, f_contracted
            else:
                shrink = True
        else:
            contracted = 0.5 * best + 0.5 * worst
            f_contracted = evaluate(contracted)
            if f_contracted < values[1]:
                simplex[1], values[1] = contracted, f_contracted
            else:
                shrink = True
        if shrink:
            simplex[1] = simplex[0] + 0.5 * (simplex[1] - simplex[0])
            values[1] = evaluate(simplex[1])
        if values[1] < values[0]:
            simplex.reverse()
            values.reverse()
    return simplex[0]


def fit_marchenko_pastur(eigenvalues: Tensor, rows: int, columns: int) -> BulkFit:
    """Fit the MP bulk to the eigenvalues of ``WᵀW`` for an ``rows × columns`` weight, and count its spikes.

    As WeightWatcher's ``mp_fit``: the ESD is rescaled to mean 1; σ is the best of a grid from 5% to 200% of
    the σ that would put the edge at λmax (1% steps), polished by a Nelder-Mead search, judged by the squared
    difference between the MP density (quarter circle of the singular values when the matrix is square) and
    a linear-kernel density estimate of the ESD (bandwidth 0.1). The edge gets the Tracy-Widom allowance.
    """
    long_side, short_side = max(rows, columns), min(rows, columns)
    aspect_ratio = long_side / short_side
    values = eigenvalues.detach().to(torch.float64).flatten().cpu()
    total = float(values.sum())
    if values.numel() == 0 or total <= 0:
        return BulkFit(math.nan, math.nan, math.nan, math.nan, 0, math.nan)
    # Rescale to mean eigenvalue 1 so that one σ grid and one bandwidth fit every layer.
    rescale = values.numel() / total
    scaled = values * rescale
    largest = float(scaled.max())
    sigma_at_top = math.sqrt(largest / (1 + 1 / math.sqrt(aspect_ratio)) ** 2)
    # The same grid as numpy.arange(0.05 s, 2 s, 0.01 s) (what scipy.optimize.brute evaluates).
    start, stop, step = 0.05 * sigma_at_top, 2.0 * sigma_at_top, 0.01 * sigma_at_top
    delta = (start + step) - start
    trials = [start + i * delta for i in range(math.ceil((stop - start) / step))]
    with _single_thread():
        misfit = _BulkMisfit(scaled.sqrt() if aspect_ratio == 1 else scaled, aspect_ratio)
        scores = misfit.many(torch.tensor(trials, dtype=torch.float64))
        sigma = _nelder_mead_1d(misfit, trials[int(torch.argmin(scores))])
    bulk_max = (sigma * (1 + 1 / math.sqrt(aspect_ratio))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(aspect_ratio))) ** 2
    tracy_widom = 1 / math.sqrt(aspect_ratio) * bulk_max ** (2 / 3) * short_side ** (-2 / 3)
    edge = bulk_max + math.sqrt(tracy_widom)
    spikes = int((scaled > edge).sum())
    return BulkFit(sigma, bulk_max / rescale, bulk_min / rescale, edge / rescale, spikes, bulk_max / largest)


# --------------------------------------------------------------------------------------------------------
# Which weights
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Weight:
    name: str
    module: nn.Module
    rows: int
    columns: int


def _matches(name: str, targets: str | Sequence[str] | None) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full-match regex, a list matches names or name suffixes."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _base_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _analysable_weights(
    model: nn.Module, target_modules: str | Sequence[str] | None, include_embeddings: bool
) -> list[_Weight]:
    """Linear, Conv1D (GPT-2 style) and Conv2d weights with the names PEFT matches (relative to the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    model = _base_model(model)
    excluded: set[int] = set()
    output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    if output_embeddings is not None and not include_embeddings:
        excluded.add(id(output_embeddings))
    found: list[_Weight] = []
    inside_adapter: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue  # the LoRA factors and the wrapped base layer of a tuner layer
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(name)
            module = module.get_base_layer()
        if id(module) in excluded or not _matches(name, target_modules):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d):
            rows, columns = weight.shape[0], int(math.prod(weight.shape[1:]))
        elif isinstance(module, Conv1D):
            columns, rows = weight.shape
        elif isinstance(module, nn.Embedding) and include_embeddings:
            rows, columns = weight.shape
        else:
            continue
        if isinstance(module, nn.Linear) and rows * columns != weight.numel():
            # A packed quantized weight: its true shape is the layer's.
            rows, columns = module.out_features, module.in_features
        found.append(_Weight(name, module, rows, columns))
    return found


def _dense_weight(record: _Weight) -> Tensor:
    """The layer's weight as a float ``rows × columns`` matrix, dequantized first where it is quantized."""
    from peft.utils.integrations import dequantize_module_weight
    from transformers.pytorch_utils import Conv1D

    weight = dequantize_module_weight(record.module).detach()
    if isinstance(record.module, Conv1D):
        weight = weight.T
    weight = weight.reshape(record.rows, record.columns)
    if not weight.is_floating_point():
        raise LoraMonitorError(
            f"module {record.name}: weight of dtype {weight.dtype} could not be dequantized"
        )
    if not bool(torch.isfinite(weight).all()):
        raise LoraMonitorError(f"module {record.name}: weight contains NaN or Inf")
    return weight


# --------------------------------------------------------------------------------------------------------
# Spectral analysis of a model
# --------------------------------------------------------------------------------------------------------


@dataclass
class LayerSpectrum:
    """The heavy-tail and random-matrix summary of one frozen weight matrix.

    ``name`` is the module path PEFT matches (``model.layers.0.self_attn.q_proj``), ``shape`` the weight as
    analysed (``out × in``; conv kernels flattened to ``out × in·kh·kw``). ``eigenvalues`` are those of ``WᵀW``
    (``σ²``), descending. ``alpha``/``xmin``/``ks_distance``/``tail_size`` come from :func:`fit_power_law`,
    ``sigma_mp``/``bulk_max``/``edge``/``num_spikes``/``mp_softrank`` from :func:`fit_marchenko_pastur`.
    ``stable_rank`` is ``Σλ/λmax`` and ``spectral_norm`` is ``σmax`` (WeightWatcher's ``spectral_norm``
    column is ``λmax = σmax²``).
    """

    name: str
    module_type: str
    layer_index: int | None
    shape: tuple[int, int]
    eigenvalues: Tensor
    fit: str
    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int
    sigma_mp: float
    bulk_max: float
    edge: float
    num_spikes: int
    mp_softrank: float
    stable_rank: float
    spectral_norm: float

    def as_dict(self) -> dict[str, Any]:
        """Everything but the eigenvalues, as plain Python values (for JSON and tables)."""
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layer_index": self.layer_index,
            "shape": list(self.shape),
            "fit": self.fit,
            "alpha": self.alpha,
            "xmin": self.xmin,
            "ks_distance": self.ks_distance,
            "tail_size": self.tail_size,
            "sigma_mp": self.sigma_mp,
            "bulk_max": self.bulk_max,
            "edge": self.edge,
            "num_spikes": self.num_spikes,
            "mp_softrank": self.mp_softrank,
            "stable_rank": self.stable_rank,
            "spectral_norm": self.spectral_norm,
        }


def spectra_from_eigenvalues(
    name: str, eigenvalues: Tensor, rows: int, columns: int, fit: FitRule = "median"
) -> LayerSpectrum:
    """The :class:`LayerSpectrum` of a weight given the eigenvalues of its ``WᵀW`` (any order)."""
    values = torch.sort(eigenvalues.detach().to(torch.float64).flatten().cpu(), descending=True).values
    power_law = fit_power_law(values, fit)
    bulk = fit_marchenko_pastur(values, rows, columns)
    module_type, layer_index = describe_module(name)
    top = float(values[0]) if values.numel() else 0.0
    return LayerSpectrum(
        name=name,
        module_type=module_type,
        layer_index=layer_index,
        shape=(rows, columns),
        eigenvalues=values,
        fit=fit,
        alpha=power_law.alpha,
        xmin=power_law.xmin,
        ks_distance=power_law.ks_distance,
        tail_size=power_law.tail_size,
        sigma_mp=bulk.sigma_mp,
        bulk_max=bulk.bulk_max,
        edge=bulk.edge,
        num_spikes=bulk.num_spikes,
        mp_softrank=bulk.mp_softrank,
        stable_rank=float(values.sum()) / top if top > 0 else 0.0,
        spectral_norm=math.sqrt(max(top, 0.0)),
    )


def spectral_analysis(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None = None,
    fit: FitRule = "median",
    include_embeddings: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    batch_size: int = 16,
    progress: bool = True,
) -> list[LayerSpectrum]:
    """One :class:`LayerSpectrum` per Linear/Conv1D/Conv2d weight of ``model``, in module order.

    ``target_modules`` selects weights as PEFT's ``LoraConfig(target_modules=...)`` would (names or name
    suffixes, or a full-match regex); the output embeddings (``lm_head``) and embeddings are left out unless
    ``include_embeddings``. A PEFT model is analysed through its base weights; quantized weights are
    dequantized first. The singular values come from one batched dense SVD per weight shape on ``device``
    (the GPU when there is one), in ``dtype`` (float64 by default), with a progress bar when ``progress``.
    """
    if fit not in ("median", "ks"):
        raise LoraMonitorError(f"unknown power-law fit rule {fit!r}: use 'median' or 'ks'")
    records = _analysable_weights(model, target_modules, include_embeddings)
    if not records:
        raise LoraMonitorError(
            f"no Linear/Conv weights to analyse in {type(model).__name__}"
            + (f" matching target_modules={target_modules!r}" if target_modules is not None else "")
        )
    singular_values = weight_singular_values(
        [_dense_weight(record) for record in records],
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
        description="weight spectra",
    )
    return [
        spectra_from_eigenvalues(record.name, values**2, record.rows, record.columns, fit)
        for record, values in zip(records, singular_values, strict=True)
    ]


@contextmanager
def _single_thread():
    """Run the MP fit on one intra-op thread.

    It is a few hundred small tensor operations (a thousand-point grid); waking a thread pool for each costs
    far more than it saves, and on a busy machine (more runnable threads than cores) each wake-up can take
    milliseconds. The SVDs and the KS scan, which do profit from threads, run outside it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------
# Rank allocation
# --------------------------------------------------------------------------------------------------------


@dataclass
class LayerAllocation:
    """One analysed layer: its spectrum, its composite score, and the rank/alpha it gets (0 if not adapted)."""

    spectrum: LayerSpectrum
    score: float
    selected: bool
    rank: int
    alpha: float

    @property
    def name(self) -> str:
        return self.spectrum.name

    @property
    def parameters(self) -> int:
        """Trainable LoRA parameters this layer gets: ``r·(m + n)``."""
        return self.rank * sum(self.spectrum.shape)


@dataclass
class RankAllocation:
    """Per-layer LoRA ranks, ready for ``LoraConfig(**allocation.lora_config_kwargs())``.

    ``rank_pattern``/``alpha_pattern`` map module paths (``model.layers.0.self_attn.q_proj``, as PEFT's
    ``get_pattern_key`` matches them) to ranks and alphas; ``target_modules`` lists the adapted modules.
    ``layers`` has every analysed layer, adapted or not, in module order.
    """

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]
    layers: list[LayerAllocation] = field(default_factory=list)
    parameter_budget: int | None = None

    def __iter__(self):
        """``rank_pattern, alpha_pattern, target_modules = allocate_ranks(model)`` also works."""
        return iter((self.rank_pattern, self.alpha_pattern, self.target_modules))

    @property
    def trainable_parameters(self) -> int:
        """Total LoRA parameters of the adapted layers, ``Σ r·(m + n)``."""
        return sum(layer.parameters for layer in self.layers if layer.selected)

    def lora_config_kwargs(self) -> dict[str, Any]:
        """``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern`` for ``LoraConfig``.

        Every adapted module has its own pattern entry; ``r``/``lora_alpha`` are the most common pair and only
        matter for modules added later by other means.
        """
        ranks = list(self.rank_pattern.values())
        r = max(set(ranks), key=ranks.count) if ranks else 8
        alphas = [a for name, a in self.alpha_pattern.items() if self.rank_pattern[name] == r]
        return {
            "r": r,
            "lora_alpha": alphas[0] if alphas else 2 * r,
            "target_modules": list(self.target_modules),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }


def _normalize(values: Tensor) -> Tensor:
    """Min-max scaling to [0, 1]; a constant column becomes all zeros."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low + 1e-8)


def _profile(scores: Tensor, scaling: Scaling) -> Tensor:
    """Where each score sits between the lowest and the highest, in [0, 1], after the chosen scaling."""
    transforms = {"linear": lambda x: x, "log": torch.log1p, "sqrt": torch.sqrt}
    if scaling not in transforms:
        raise LoraMonitorError(f"unknown rank scaling {scaling!r}: use 'linear', 'log' or 'sqrt'")
    scaled = transforms[scaling](scores.clamp_min(0))
    return (scaled - scaled.min()) / (scaled.max() - scaled.min() + 1e-8)


def _budget_ranks(fractions: Tensor, steps: Tensor, caps: Tensor, budget: int, names: list[str]) -> Tensor:
    """Integer ranks proportional to ``fractions`` whose parameter cost ``Σ r·step`` is within one step of ``budget``.

    Find the scale ``c`` with ``Σ clip(c·f, 1, cap)·step = budget`` by bisection, round down, then give one
    more rank to the layers with the largest remainders while the budget allows: what is left over is then
    smaller than the step of any layer that could still grow.
    """
    floor_cost = int(steps.sum())
    ceiling_cost = int((caps * steps).sum())
    if budget < floor_cost:
        raise LoraMonitorError(
            f"parameter budget {budget} is below {floor_cost}, the cost of rank 1 on all {len(names)} adapted layers"
        )
    if budget > ceiling_cost:
        raise LoraMonitorError(
            f"parameter budget {budget} is above {ceiling_cost}, the cost of full rank on every adapted layer"
        )

    def cost(scale: float) -> float:
        return float(((fractions * scale).clamp(1, None).minimum(caps) * steps).sum())

    low, high = 0.0, 1.0
    while cost(high) < budget:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) < budget else (low, middle)
    continuous = (fractions * low).clamp(1, None).minimum(caps)
    ranks = continuous.floor().clamp(1, None)
    spent = int((ranks * steps).sum())
    for index in torch.argsort(continuous - ranks, descending=True, stable=True).tolist():
        if ranks[index] < caps[index] and spent + int(steps[index]) <= budget:
            ranks[index] += 1
            spent += int(steps[index])
    # A second pass: the remainder order may have skipped a cheap layer that still fits.
    for index in torch.argsort(steps, stable=True).tolist():
        while ranks[index] < caps[index] and spent + int(steps[index]) <= budget:
            ranks[index] += 1
            spent += int(steps[index])
    return ranks.to(torch.int64)


def allocate_ranks(
    model_or_spectra: nn.Module | Sequence[LayerSpectrum],
    *,
    min_rank: int = 4,
    max_rank: int = 64,
    layer_fraction: float = 0.5,
    scaling: Scaling = "linear",
    alpha_factor: float = 2.0,
    w_alpha: float = 0.7,
    w_spikes: float = 0.3,
    target_modules: str | Sequence[str] | None = None,
    parameter_budget: int | None = None,
    fit: FitRule = "median",
    progress: bool = True,
) -> RankAllocation:
    """Per-layer LoRA ranks from base-weight spectra (Adaptive-Rank LoRA), ready for ``LoraConfig``.

    Each layer gets the score ``w_alpha·α̂ + w_spikes·(1 - ŝ)``, with ``α̂`` the Hill exponent and ``ŝ`` the MP
    spike count, both min-max scaled over the analysed layers. A high score is a light tail with few spikes:
    a layer close to random, which the method gives more rank. The ``layer_fraction`` of layers with the
    *lowest* scores (the most heavy-tailed, spike-rich ones) is adapted, as in the method's published code;
    within them, ranks go from ``min_rank`` (lowest score) to ``max_rank`` (highest), spaced linearly, or
    by ``log1p``/``sqrt`` of the score, rounded. ``alpha = alpha_factor·rank``.

    With ``parameter_budget``, the adapted layers keep the same rank profile scaled so that the LoRA
    parameter count ``Σ r·(m + n)`` lands within one rank step of the budget (ranks between 1 and
    ``min(m, n)``; ``min_rank``/``max_rank`` then only shape the profile).

    ``model_or_spectra`` is a model (analysed with :func:`spectral_analysis`, ``fit`` and ``target_modules``
    applying) or the list that function returned.
    """
    if not 1 <= min_rank <= max_rank:
        raise LoraMonitorError(
            f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}"
        )
    if not 0 < layer_fraction <= 1:
        raise LoraMonitorError(f"layer_fraction must be in (0, 1], got {layer_fraction}")
    if alpha_factor <= 0:
        raise LoraMonitorError(f"alpha_factor must be positive, got {alpha_factor}")
    if isinstance(model_or_spectra, nn.Module):
        spectra = spectral_analysis(
            model_or_spectra, target_modules=target_modules, fit=fit, progress=progress
        )
    else:
        spectra = [s for s in model_or_spectra if _matches(s.name, target_modules)]
        if not spectra:
            raise LoraMonitorError("no layer spectra to allocate ranks to")
    alphas = torch.tensor([s.alpha for s in spectra], dtype=torch.float64)
    # A failed fit (too few eigenvalues) scores as the most random layer of the model.
    finite = torch.isfinite(alphas)
    fallback = float(alphas[finite].max()) if bool(finite.any()) else 0.0
    alphas = torch.where(finite, alphas, torch.full_like(alphas, fallback))
    spikes = torch.tensor([float(s.num_spikes) for s in spectra], dtype=torch.float64)
    scores = w_alpha * _normalize(alphas) + w_spikes * (1 - _normalize(spikes))

    count = max(1, int(len(spectra) * layer_fraction))
    chosen = sorted(torch.argsort(scores, stable=True)[:count].tolist())
    profile = _profile(scores[chosen], scaling)
    caps = torch.tensor([min(spectra[i].shape) for i in chosen], dtype=torch.float64)
    if parameter_budget is None:
        ranks = (min_rank + (max_rank - min_rank) * profile).round().clamp(min_rank, max_rank)
        ranks = ranks.minimum(caps).to(torch.int64)
    else:
        steps = torch.tensor([float(sum(spectra[i].shape)) for i in chosen], dtype=torch.float64)
        fractions = min_rank + (max_rank - min_rank) * profile
        ranks = _budget_ranks(
            fractions, steps, caps, int(parameter_budget), [spectra[i].name for i in chosen]
        )

    rank_of = {spectra[i].name: int(r) for i, r in zip(chosen, ranks.tolist(), strict=True)}
    keys = {name: pattern_key(name) for name in rank_of}
    layers = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for index, spectrum in enumerate(spectra):
        rank = rank_of.get(spectrum.name, 0)
        alpha = json_number(alpha_factor * rank)
        layers.append(LayerAllocation(spectrum, float(scores[index]), rank > 0, rank, alpha if rank else 0.0))
        if rank:
            rank_pattern[keys[spectrum.name]] = rank
            alpha_pattern[keys[spectrum.name]] = alpha
    return RankAllocation(rank_pattern, alpha_pattern, list(rank_of), layers, parameter_budget)


# --------------------------------------------------------------------------------------------------------
# Gradient probe
# --------------------------------------------------------------------------------------------------------


@dataclass
class RankProbe:
    """What the loss gradient of a few batches says about the rank each module type needs.

    ``module_ranks`` is the smallest rank holding ``threshold`` of each module's accumulated gradient energy;
    ``type_ranks`` the same for each module type (from the mean energy curve of its modules), rounded up to
    a power of two; ``rank`` the largest of those. ``energy_curves`` holds each module's cumulative energy.
    """

    rank: int
    type_ranks: dict[str, int]
    module_ranks: dict[str, int]
    energy_curves: dict[str, Tensor]
    threshold: float
    steps: int

    def summary(self) -> str:
        """``Based on your data, r=16 (q_proj 8, v_proj 16, ...)``."""
        parts = ", ".join(f"{kind} {rank}" for kind, rank in self.type_ranks.items())
        return (
            f"Based on your data, r={self.rank} ({parts}; {self.threshold:.0%} of the gradient energy of "
            f"{self.steps} batches)"
        )


def _next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def probe_rank(
    model: nn.Module,
    dataloader: Iterable[dict[str, Any]],
    steps: int = 4,
    target_modules: str | Sequence[str] | None = None,
    threshold: float = 0.9,
    *,
    device: torch.device | str | None = None,
) -> RankProbe:
    """Recommend a LoRA rank per module type from the loss gradient, before any training step.

    Runs ``steps`` batches from ``dataloader`` (dicts of tensors for ``model(**batch)``, with labels so that
    the model returns a loss), sums the gradient of the loss with respect to each target weight (the same
    weights :func:`spectral_analysis` would pick), and reads the rank that keeps ``threshold`` of the
    summed gradient's energy. Nothing is updated: gradients are taken with ``torch.autograd.grad`` (no
    ``.grad`` is written), and every ``requires_grad`` flag is restored afterwards.
    """
    if not 0 < threshold <= 1:
        raise LoraMonitorError(f"threshold must be in (0, 1], got {threshold}")
    if steps < 1:
        raise LoraMonitorError(f"steps must be at least 1, got {steps}")
    records = _analysable_weights(model, target_modules, include_embeddings=False)
    if not records:
        raise LoraMonitorError(f"no Linear/Conv weights to probe in {type(model).__name__}")
    weights = [record.module.weight for record in records]
    for record, weight in zip(records, weights, strict=True):
        if not weight.is_floating_point():
            raise LoraMonitorError(
                f"module {record.name}: cannot take gradients of a quantized ({weight.dtype}) weight"
            )
    saved_flags = [p.requires_grad for p in model.parameters()]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    model_device = next(model.parameters()).device
    done = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for batch in dataloader:
            if done >= steps:
                break
            inputs = {k: v.to(model_device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            output = model(**inputs)
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if loss is None:
                raise LoraMonitorError("the model returned no loss: give batches with labels")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.detach().float())
            done += 1
    finally:
        for p, flag in zip(model.parameters(), saved_flags, strict=True):
            p.requires_grad_(flag)
    if done == 0:
        raise LoraMonitorError("the dataloader gave no batches to probe with")

    matrices = [
        g.T if _is_conv1d(record.module) else g.reshape(record.rows, record.columns)
        for g, record in zip(sums, records, strict=True)
    ]
    singular_values = weight_singular_values(matrices, device=device, dtype=torch.float32)
    curves: dict[str, Tensor] = {}
    module_ranks: dict[str, int] = {}
    by_type: dict[str, list[Tensor]] = {}
    for record, values in zip(records, singular_values, strict=True):
        curves[record.name] = energy_curve(values)
        module_ranks[record.name] = rank_for_energy(values, threshold)
        if not torch.isnan(curves[record.name]).all():
            by_type.setdefault(describe_module(record.name)[0], []).append(curves[record.name])
    type_ranks: dict[str, int] = {}
    for kind, kind_curves in by_type.items():
        length = min(c.shape[0] for c in kind_curves)
        mean_curve = torch.stack([c[:length] for c in kind_curves]).mean(0)
        reached = (mean_curve >= threshold - 1e-12).nonzero()
        needed = int(reached[0]) + 1 if len(reached) else length
        type_ranks[kind] = min(_next_power_of_two(needed), length)
    rank = max(type_ranks.values()) if type_ranks else 0
    return RankProbe(rank, type_ranks, module_ranks, curves, threshold, done)


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)
