"""A LoRA adapter over time: per-module trends, saturation and κ volatility across checks.

:class:`MetricsHistory` keeps the :class:`~lora_monitor.monitor.metrics.ModuleMetrics` of every check;
:class:`ModuleDynamics` is what it derives for one module (rank-utilization trend, steps to saturation,
volatility of ``log10 κ``), and :func:`dynamics_scalars` the counts and means sent to loggers. Checks of a
zero or non-finite ΔW carry no trend and are skipped; a module resized during training starts over.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _io
from .metrics import ModuleMetrics


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
    ``gradient_effective_rank`` is the latest check's (None where that check did not measure it: see
    ``SpectralMonitorCallback(gradient_every_n_steps=...)``).
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

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        record = _io.plain_fields(self)
        return _io.json_safe(record) if json_safe else record


class _Run:
    """The longest run of unchanged values ending at the latest point seen: ``values[start:length]``.

    Unchanged means a spread ``max − min`` of at most ``tolerance × max |value|``. For positive values
    (effective ranks) a window that is not unchanged stays so when it grows, so the run's start only moves
    forward: each point is added once and the window's lowest and highest values are kept in monotonic
    queues, at a constant cost per point however long the run (walking back over the run at each point
    that breaks it cost a check more the longer a plateau lasted).
    """

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.start = self.length = 0
        self.finite = False
        self._lows: deque[tuple[int, float]] = deque()  # values increasing from the front
        self._highs: deque[tuple[int, float]] = deque()  # values decreasing from the front

    def add(self, value: float) -> None:
        """Extend the run with the next point's value."""
        index, self.length = self.length, self.length + 1
        if not math.isfinite(value):  # nothing runs through a non-finite value
            self.start, self.finite = index, False
            self._lows.clear()
            self._highs.clear()
            return
        if not self.finite:
            self.start, self.finite = index, True
        while self._lows and self._lows[-1][1] >= value:
            self._lows.pop()
        self._lows.append((index, value))
        while self._highs and self._highs[-1][1] <= value:
            self._highs.pop()
        self._highs.append((index, value))
        while not self._fits():
            self.start += 1
            if self._lows[0][0] < self.start:
                self._lows.popleft()
            if self._highs[0][0] < self.start:
                self._highs.popleft()

    def _fits(self) -> bool:
        low, high = self._lows[0][1], self._highs[0][1]
        return high - low <= self.tolerance * max(abs(low), abs(high))


@dataclass
class _EarlyPeak:
    """Peak of the early points seen so far and the lowest point after it (for the early-collapse rule)."""

    consumed: int = 0
    count: int = 0
    peak: float = -math.inf
    lowest_after: float = math.inf


@dataclass
class _RankSeries:
    """One module's usable checks (ΔW non-zero and finite) at one nominal rank, and what was derived from
    them so far: the saturation run per tolerance and the early peak per horizon."""

    points: list[tuple[int, ModuleMetrics]] = field(default_factory=list)
    runs: dict[float, _Run] = field(default_factory=dict)
    early: dict[int, _EarlyPeak] = field(default_factory=dict)


@dataclass
class _Track:
    """One module's checks, kept as they arrive so that a check costs the same at step 10 and at step
    10,000: the usable ones per nominal rank (a resized module starts a new series), and their count."""

    rank: int | None = None
    by_rank: dict[int, _RankSeries] = field(default_factory=dict)
    usable_checks: int = 0  # at any rank
    first_usable_step: int | None = None

    @property
    def current(self) -> _RankSeries:
        """The series at the module's latest nominal rank."""
        series = self.by_rank.get(self.rank)
        if series is None:  # not setdefault: that builds a new (discarded) series at every read
            series = self.by_rank[self.rank] = _RankSeries()
        return series

    def add(self, step: int, record: ModuleMetrics) -> None:
        self.rank = record.nominal_rank
        if record.is_zero or record.non_finite:
            return
        self.current.points.append((step, record))
        self.usable_checks += 1
        if self.first_usable_step is None:
            self.first_usable_step = step


@dataclass
class MetricsHistory:
    """The per-module metrics of every check, and the dynamics derived from them.

    ``trend_tolerance``: relative change of rank utilization over the window that counts as a trend.
    ``saturation_tolerance``: relative spread of effective rank that counts as unchanged, for
    ``saturation_checks`` consecutive checks. Each derived quantity is updated from the checks that are new
    since the last time it was asked for, so the cost of a check does not grow with the length of the run.
    """

    window: int = 5
    trend_tolerance: float = 0.1
    saturation_tolerance: float = 0.02
    saturation_checks: int = 5
    steps: list[int] = field(default_factory=list)
    records: dict[str, list[tuple[int, ModuleMetrics]]] = field(default_factory=dict)
    _tracks: dict[str, _Track] = field(default_factory=dict, init=False, repr=False)

    def add(self, step: int, metrics: Iterable[ModuleMetrics]) -> None:
        """Record one check (a second check at the same step replaces the first)."""
        if self.steps and self.steps[-1] == step:
            for name, series in self.records.items():
                if series and series[-1][0] == step:
                    series.pop()
                    self._tracks.pop(name, None)  # rebuilt from the records when next asked for
        else:
            self.steps.append(step)
        for record in metrics:
            self.records.setdefault(record.name, []).append((step, record))
            track = self._tracks.get(record.name)
            if track is not None:
                track.add(step, record)

    def _track(self, name: str) -> _Track:
        track = self._tracks.get(name)
        if track is None:
            track = self._tracks[name] = _Track()
            for step, record in self.records.get(name, []):
                track.add(step, record)
        return track

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
            and not record.non_finite
            and getattr(record, metric) is not None
            and (nominal_rank is None or record.nominal_rank == nominal_rank)
        ]

    def latest_rank(self, name: str) -> int | None:
        """The nominal rank of module ``name`` at its latest check (None if it was never checked)."""
        series = self.records.get(name)
        return series[-1][1].nominal_rank if series else None

    def current_series(
        self, name: str, metric: str = "effective_rank", *, last: int | None = None
    ) -> list[tuple[int, float]]:
        """:meth:`series` over the checks made at the module's latest nominal rank only; ``last`` keeps only
        the latest ones.

        The dynamics (trend, saturation, κ volatility) are of this series: after a resize the module's
        earlier checks at another rank are another adapter, and comparing with them would show a trend
        (or a plateau) that training did not make.
        """
        points = self._track(name).current.points
        if last is not None:
            points = points[-last:]
        return [
            (step, getattr(record, metric)) for step, record in points if getattr(record, metric) is not None
        ]

    def trend(self, name: str) -> tuple[str | None, float | None]:
        """Trend of rank utilization over the last ``window`` non-zero checks at the current rank, and its
        relative change."""
        return self._trend(self._recent(name))

    def _recent(self, name: str) -> list[tuple[int, ModuleMetrics]]:
        """The last ``window`` usable checks at the module's current rank: what trend and volatility read."""
        return self._track(name).current.points[-self.window :]

    def _trend(self, recent: Sequence[tuple[int, ModuleMetrics]]) -> tuple[str | None, float | None]:
        points = [(step, record.rank_utilization) for step, record in recent]
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
        series = self._track(name).current
        points = series.points
        if not points or len(points) < checks:
            return None
        run = series.runs.get(tolerance)
        if run is None or run.length > len(points):  # new, or the points were rebuilt
            run = series.runs[tolerance] = _Run(tolerance)
        for _, record in points[run.length :]:
            run.add(record.effective_rank)
        if len(points) - run.start < checks:
            return None
        return points[run.start][0]

    def early_peak_drop(self, name: str, until_step: int) -> float | None:
        """Over the usable checks at the current rank up to ``until_step``: the relative drop from the
        effective rank's first peak to the lowest value after it (None with fewer than two such checks,
        or nothing after the peak)."""
        series = self._track(name).current
        state = series.early.setdefault(until_step, _EarlyPeak())
        for step, record in series.points[state.consumed :]:
            state.consumed += 1
            if step > until_step:
                continue
            state.count += 1
            value = record.effective_rank
            if value > state.peak:
                state.peak, state.lowest_after = value, math.inf
            else:
                state.lowest_after = min(state.lowest_after, value)
        if state.count < 2 or not math.isfinite(state.lowest_after) or state.peak <= 0:
            return None
        return 1 - state.lowest_after / state.peak

    def kappa_volatility(self, name: str, factor: str) -> float | None:
        """Standard deviation of ``log10 κ`` of factor ``"A"`` or ``"B"`` over the last ``window`` checks at
        the current rank (None without two finite values)."""
        return _log10_spread([getattr(record, f"kappa_{factor}") for _, record in self._recent(name)])

    def dynamics(self, name: str) -> ModuleDynamics:
        """Everything :class:`ModuleDynamics` holds for module ``name``."""
        track = self._track(name)
        recent = self._recent(name)  # read once for the trend and both volatilities
        trend, change = self._trend(recent)
        since = self.saturated_since(name)
        latest = self.records.get(name, [])
        gradient_rank = latest[-1][1].gradient_effective_rank if latest else None
        return ModuleDynamics(
            name=name,
            checks=track.usable_checks,
            trend=trend,
            rank_utilization_change=change,
            saturated_since=since,
            steps_to_saturation=None if since is None else since - track.first_usable_step,
            kappa_A_volatility=_log10_spread([record.kappa_A for _, record in recent]),
            kappa_B_volatility=_log10_spread([record.kappa_B for _, record in recent]),
            gradient_effective_rank=gradient_rank,
        )

    def all_dynamics(self) -> list[ModuleDynamics]:
        return [self.dynamics(name) for name in self.records]


def _log10_spread(values: Sequence[float | None]) -> float | None:
    """Standard deviation of ``log10`` of the finite positive values (None with fewer than two)."""
    logs = [math.log10(value) for value in values if value is not None and math.isfinite(value) and value > 0]
    if len(logs) < 2:
        return None
    mean = sum(logs) / len(logs)  # statistics.pstdev is exact but 20× slower, at every check
    return math.sqrt(sum((value - mean) ** 2 for value in logs) / len(logs))


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
    """Counts of modules per trend and saturated, and the mean κ volatility of each factor."""
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
