"""One health check of a LoRA adapter, from any training loop: :class:`Monitor` and its :class:`MonitorRecord`.

::

    monitor = Monitor(thresholds={"dominance_warning": 0.2})
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        loss.backward()
        if step % 50 == 0:
            monitor.record_gradients(model, step)  # before optimizer.step(): gradients exist only here
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            record = monitor.check(model, step, optimizer=optimizer)
            for alert in record.new_alerts:
                print(alert)

The Trainer callback (:class:`lora_monitor.callbacks.SpectralMonitorCallback`) and ``lora-monitor analyze``
call exactly this. :meth:`MonitorRecord.to_dict` is the line of ``lora_monitor.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _io
from .._distributed import gather_objects, my_share
from ..adapters import LiveModules, LoraModule, factor_parameters
from ..errors import check_number
from .alerts import Alert, AlertMonitor, AlertThresholds
from .gradients import gradient_effective_ranks
from .history import MetricsHistory, ModuleDynamics, dynamics_scalars
from .intruders import BaseSubspaceCache, intruder_dimensions
from .metrics import BaseNormCache, ModuleMetrics, compute_module_metrics
from .summary import AdapterSummary, summarize


@dataclass
class MonitorRecord:
    """Everything one check found: per-module ``metrics``, their ``summary``, the ``dynamics`` so far, the
    alerts raised for the first time at this check (``new_alerts``) and the flat ``scalars`` for loggers.

    ``local_module_count``: how many modules this process measured (its share in a distributed run).
    """

    step: int
    epoch: float | None
    metrics: list[ModuleMetrics]
    summary: AdapterSummary
    dynamics: list[ModuleDynamics]
    new_alerts: list[Alert]
    scalars: dict[str, float]
    local_module_count: int = 0

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        """The JSONL line: ``step``, ``epoch``, ``summary``, ``scalars``, ``alerts`` (the new ones),
        ``dynamics`` and ``modules``, strict-JSON ready (NaN and ±inf are null). ``json_safe=False`` leaves
        non-finite floats as they are, for a writer that replaces them itself when there are any
        (:func:`lora_monitor._io.dumps`: at most checks there are none, and the pass is saved)."""
        scalars = _io.json_safe(self.scalars) if json_safe else dict(self.scalars)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "summary": self.summary.to_dict(json_safe=json_safe),
            "scalars": scalars,
            "alerts": [alert.to_dict() for alert in self.new_alerts],
            "dynamics": [d.to_dict(json_safe=json_safe) for d in self.dynamics],
            "modules": [m.to_dict(json_safe=json_safe) for m in self.metrics],
        }


@dataclass
class _FirstSeen:
    step: int
    rank: int
    fingerprint: tuple[float, ...]
    moved: bool = False


@dataclass
class Monitor:
    """Watches one LoRA adapter over checks: metrics, history, alerts (each once), summary and scalars.

    Args:
        thresholds: alert thresholds, an :class:`AlertThresholds` or a dict of overrides.
        adapter_name: the adapter to watch; by default the active one (never TRL's reference adapter).
        track_gradients: keep the gradient effective ranks given by :meth:`record_gradients`.
        base_weights: ``name -> frozen weight`` for a saved adapter (dominance and update scale); a live
            model's own base weights are used without it.
        intruders_every: also count intruder dimensions (:mod:`lora_monitor.monitor.intruders`) at checks
            whose step is a multiple of this (None: never). A randomized SVD of ``W + s·B@A`` per module
            (about 0.03 s for a 1024-wide module on one CPU thread, the base directions cached after the
            first time): meant for a low frequency. Not under FSDP2.

    ``history`` (:class:`MetricsHistory`), ``alerts`` (every alert raised) and ``latest`` (the last
    :class:`MonitorRecord`, or None) are there after any check.
    """

    thresholds: AlertThresholds | Mapping[str, Any] | None = None
    adapter_name: str | None = None
    track_gradients: bool = True
    base_weights: Callable[[str], torch.Tensor | None] | None = None
    intruders_every: int | None = None
    history: MetricsHistory = field(init=False)
    latest: MonitorRecord | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.thresholds = AlertThresholds.from_value(self.thresholds)  # a bad threshold raises here
        self._base_norms = BaseNormCache(self.base_weights)
        if self.intruders_every is not None:
            check_number(self.intruders_every, "intruders_every", low=1, whole=True)
        self._base_subspaces = BaseSubspaceCache()
        self.reset()

    def reset(self) -> None:
        """Start over: empty history, alerts and latest record (base norms stay cached: the base is frozen)."""
        limits = self.thresholds
        self._alert_monitor = AlertMonitor(limits)
        self.history = MetricsHistory(
            saturation_tolerance=limits.saturation_tolerance, saturation_checks=limits.saturation_checks
        )
        self.latest = None
        self._pending_gradients: tuple[int, dict[str, float]] | None = None
        self._first_seen: dict[str, _FirstSeen] = {}
        self._modules = LiveModules()  # a new run may come with a new model layout

    def _measure(self, model: Any) -> tuple[list[LoraModule], list[LoraModule], list[ModuleMetrics]]:
        """Every LoRA module of ``model``, this process's share of them, and the metrics of that share."""
        # Under FSDP2 reading a factor or a base weight is a gather, a collective that every process must join
        # in the same order: lora_modules gathers every module's factors in every process, and each base
        # weight is gathered (and measured) here, the first time, before any process takes its share.
        modules = self._modules(model, self.adapter_name)
        if self._modules.sharded:
            for module in modules:
                self._base_norms.get(module)
        mine = my_share(modules)
        return modules, mine, compute_module_metrics(mine, self._base_norms)

    def verify_restored(self, model: Any, step: int) -> list[Alert]:
        """At a resume, before the first step: the adapter as the checkpoint restored it, judged by the rule
        that only a broken checkpoint can break (``half_restored_adapter``), without recording a check (the
        run that was never stopped made none here, or made it before the save). Returns its new alerts, also
        in :attr:`alerts`. A collective in a distributed run, like :meth:`check`."""
        modules, _, local = self._measure(model)
        for module in modules:  # the factors as restored: unchanged since the last logged check said so
            first = self._first_seen.get(module.name)
            if first is not None and not first.moved and not first.fingerprint:
                first.fingerprint = _fingerprint(module)
        by_name = {record.name: record for record in gather_objects(local)}
        metrics = [by_name[module.name] for module in modules if module.name in by_name]
        return self._alert_monitor.update(metrics, None, step, codes=("half_restored_adapter",))

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Start over from the checks of a run's JSONL log (:meth:`MonitorRecord.to_dict` lines, in order):
        the history and the alerts are what they were after the last of them, as when a resumed run goes on
        from its checkpoint. Returns how many checks were replayed.

        Rebuilt from each line's per-module metrics exactly as :meth:`check` built them (the floats round
        trip), so every later check sees the same trends and raises the same new alerts as the run that was
        never stopped. Not in the log: the fingerprints of factors that had not moved by their last logged
        check (:meth:`verify_restored` takes them from the restored model; without it such factors count as
        moved), and the latest record."""
        self.reset()
        for record in records:
            step = int(record["step"])
            metrics = [ModuleMetrics.from_dict(module) for module in record.get("modules", [])]
            self.history.add(step, metrics)
            self._alert_monitor.update(metrics, self.history, step)
        # Which factors had moved: the last logged check of each module says so (unchanged_since None: they
        # had). The fingerprints of those that had not are not in the log: verify_restored takes them from the
        # restored factors (until then they count as moved, never as untouched).
        for name, series in self.history.records.items():
            step, last = series[-1]
            moved = last.unchanged_since is None
            self._first_seen[name] = _FirstSeen(
                step if moved else last.unchanged_since, last.nominal_rank, (), moved
            )
        return len(self.history.steps)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far, in order (each condition once per module)."""
        return self._alert_monitor.alerts

    @property
    def alert_counts(self) -> dict[str, int]:
        """Number of alerts raised per ``code/severity``."""
        return self._alert_monitor.counts

    def record_gradients(self, model: Any, step: int) -> None:
        """Measure the gradient step through each adapter now (call it after ``backward`` and clipping,
        before ``optimizer.step()``); :meth:`check` at the same ``step`` attaches it to the records."""
        if self.track_gradients:
            modules = self._modules(model, self.adapter_name)
            if not self._modules.sharded:
                modules = my_share(modules)  # FSDP2: gradients are gathered whole, so each process does all
            self._pending_gradients = (step, gradient_effective_ranks(modules))

    def check(
        self, model: Any, step: int, epoch: float | None = None, *, optimizer: Any = None
    ) -> MonitorRecord:
        """Measure every LoRA module of ``model`` (a live model, a ``SavedAdapter`` or an adapter folder),
        update the history and alerts, and return the :class:`MonitorRecord` of this check.

        The modules found at the first check are kept while the model's layout holds, and found again when
        it changes (a module resized or masked by In-Squeeze is seen as it is now); LoRA layers injected
        into the model after the first check are seen after :meth:`reset`.
        In a distributed run each process measures its share and every process gets every record (a
        collective: every process must call it). Under FSDP2 every process first gathers every module's
        factors (and each base weight, once), so the metrics equal a single process's. ``optimizer`` lets the ``dead_adapter`` alert name a
        learning rate of 0 or parameters missing from the optimizer.
        """
        modules, mine, local = self._measure(model)
        sharded = self._modules.sharded
        gradients = {}
        if self._pending_gradients is not None and self._pending_gradients[0] == step:
            gradients = self._pending_gradients[1]
        self._pending_gradients = None
        learning_rates = _learning_rates(optimizer)
        for module, record in zip(mine, local, strict=True):
            record.gradient_effective_rank = gradients.get(record.name)
            record.unchanged_since = self._unchanged_since(module, record, step)
            record.frozen_reason = _frozen_reason(module, learning_rates)
        if self.intruders_every and step % self.intruders_every == 0 and not sharded:
            by_module = {module.name: module for module in mine}
            weight_of = self.base_weights or (lambda name: by_module[name].base_weight())
            # NaN/Inf factors or base weights have no spectrum to compare: alerted as non_finite instead.
            finite = [m for m, r in zip(mine, local, strict=True) if not (r.non_finite or r.non_finite_base)]
            found = intruder_dimensions(finite, lambda m: weight_of(m.name), cache=self._base_subspaces)
            counts = {item.name: item.count for item in found}
            for record in local:
                record.intruder_dimensions = counts.get(record.name)
        by_name = {record.name: record for record in gather_objects(local)}
        metrics = [by_name[module.name] for module in modules if module.name in by_name]

        self.history.add(step, metrics)
        new_alerts = self._alert_monitor.update(metrics, self.history, step)
        summary = summarize(metrics)
        dynamics = [d for d in self.history.all_dynamics() if d.name in by_name]
        scalars = {**summary.scalars(), **dynamics_scalars(dynamics)}
        counted = [m.intruder_dimensions for m in metrics if m.intruder_dimensions is not None]
        if counted:
            scalars["lora/intruder_dimensions"] = float(sum(counted))
            scalars["lora/modules_with_intruders"] = float(sum(count > 0 for count in counted))
        scalars["lora/alerts_total"] = float(len(self.alerts))
        scalars["lora/new_alerts"] = float(len(new_alerts))
        self.latest = MonitorRecord(step, epoch, metrics, summary, dynamics, new_alerts, scalars, len(local))
        return self.latest

    def _unchanged_since(self, module: LoraModule, record: ModuleMetrics, step: int) -> int | None:
        """The step of the first check from which the pair's factors have stayed bit-identical, else None
        (always None for a saved adapter, which does not train)."""
        if module.module is None:
            return None
        first = self._first_seen.get(record.name)
        if first is not None and first.rank == record.nominal_rank:
            if first.moved:
                return None  # it trained once: the fingerprint is not needed any more (until a resize)
            if not first.fingerprint:  # replayed from a log, never fingerprinted since: not known untouched
                first.moved = True
                return None
        fingerprint = _fingerprint(module)
        if first is None or first.rank != record.nominal_rank:  # a resized module starts over
            first = self._first_seen[record.name] = _FirstSeen(step, record.nominal_rank, fingerprint)
        if fingerprint != first.fingerprint:
            first.moved = True
            return None
        return first.step


def _fingerprint(module: LoraModule) -> tuple[float, ...]:
    """Sum and squared sum of B and A, in float64: equal only if the factors did not move.

    Not a copy of the factors (that would double the adapter's memory); any optimizer step changes them.
    """
    B, A = module.B.double(), module.A.double()
    return tuple(torch.stack([B.sum(), B.square().sum(), A.sum(), A.square().sum()]).tolist())


def _learning_rates(optimizer: Any) -> dict[int, float] | None:
    """``id(parameter) -> learning rate`` of the optimizer's param groups (None without an optimizer)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    # The configured rate (``initial_lr``, kept by every torch LR scheduler), not the current one: a linear
    # schedule ends at 0, and a module is not "frozen" on the last step of a normal run.
    return {
        id(param): float(group.get("initial_lr", group.get("lr", 0.0)))
        for group in groups
        for param in group["params"]
    }


def _frozen_reason(module: LoraModule, learning_rates: dict[int, float] | None) -> str | None:
    """Why a live pair cannot train, where that is visible: requires_grad, learning rate, optimizer."""
    if module.module is None:
        return None
    parameters = module.live_parameters or factor_parameters(module.module, module.adapter_name)
    if not any(param.requires_grad for param in parameters):
        return "requires_grad is off"
    if learning_rates is None:
        return None
    if not any(id(param) in learning_rates for param in parameters):
        return "not in the optimizer"
    if all(learning_rates.get(id(param), 0.0) == 0.0 for param in parameters):
        return "learning rate 0"
    return None


__all__ = ["Monitor", "MonitorRecord"]
