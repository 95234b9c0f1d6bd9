"""Heavy-tailed self-regularization (HT-SR): what the eigenvalues of a frozen weight say about it.

From the eigenvalues ``λ = σ²`` of ``WᵀW`` (the empirical spectral density, ESD) of one weight:

- the **power-law exponent α** of the ESD's tail (Hill estimator): a small α (heavy tail) marks a layer
  with much learned structure, a large α one that is closer to random;
- the **spikes**: eigenvalues above the Marchenko-Pastur (MP) bulk edge ``λ+ = σ²(1 + 1/√Q)²`` of a random
  matrix of the same shape (``Q = N/M ≥ 1``), widened by the Tracy-Widom fluctuation of the edge.

The definitions follow WeightWatcher 0.7.7 (``weightwatcher.py``/``WW_powerlaw.py``/``RMT_Util.py``) so the
numbers can be compared with it; the tests do. What differs is how they are computed: the KS scan over
every candidate ``xmin`` is one vectorized O(M²) tensor computation rather than a Python loop, and the MP
fit evaluates its kernel density once per layer rather than once per trial σ. This module only works on
eigenvalues; where they come from (one batched SVD) is :mod:`.allocate`'s business.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from ..adapters import describe_module
from .options import check_fit

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

# ---- power-law fit of the tail (Hill estimator) ----------------------------------------------------------


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
    check_fit(fit)
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


# ---- Marchenko-Pastur bulk and its spikes ----------------------------------------------------------------


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


# ---- one layer's summary ---------------------------------------------------------------------------------


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
        document = {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "eigenvalues"
        }
        return {**document, "shape": list(self.shape)}


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
        **{name: getattr(power_law, name) for name in ("alpha", "xmin", "ks_distance", "tail_size")},
        **{
            name: getattr(bulk, name)
            for name in ("sigma_mp", "bulk_max", "edge", "num_spikes", "mp_softrank")
        },
        stable_rank=float(values.sum()) / top if top > 0 else 0.0,
        spectral_norm=math.sqrt(max(top, 0.0)),
    )
