"""``SpectralMonitorCallback``: LoRA adapter health every N steps, for any ``transformers.Trainer``.

Works unchanged in TRL's ``SFTTrainer`` and ``GRPOTrainer`` (they are Trainers)::

    trainer = Trainer(..., callbacks=[SpectralMonitorCallback(every_n_steps=50)])

Every ``every_n_steps`` optimizer steps (and at the start and the end of training) it measures every LoRA
module of the trained adapter (:mod:`lora_monitor.metrics`), raises alerts (:mod:`lora_monitor.alerts`) and
reports:

- scalars such as ``lora/mean_effective_rank``, ``lora/min_rank_utilization``, ``lora/max_dominance`` to
  every integration the Trainer reports to (``report_to``: W&B, TensorBoard, ...) and to
  ``state.log_history``, as a log event of their own at the check step;
- one JSON line per check with every module's record to ``output_dir/lora_monitor.jsonl``;
- new alerts to the ``lora_monitor`` Python logger, and to ``callback.alerts``;
- with W&B active, a ``wandb.Table`` of the latest per-module metrics (``lora/module_metrics``) and the
  alert counts in the run summary (``lora/alerts/...``).

How the scalars reach the integrations: the Trainer calls reporting callbacks (W&B, TensorBoard, ...)
before user callbacks, so keys added to ``logs`` in ``on_log`` would reach neither the integrations nor
``log_history``. Instead, at a check step this callback issues a log event itself through the Trainer's
``CallbackHandler``, exactly as ``Trainer.log`` does (append to ``state.log_history``, then
``callback_handler.on_log``), so every integration sees it. It does not call ``trainer.log`` itself,
because subclasses override that: TRL's trainers fold their accumulated metrics into whatever is logged
and clear them, which would split their logging windows. The handler is the one that calls this callback:
it is found on the call stack at init end and at every train begin (the ``CallbackHandler`` whose
``callbacks`` contain this very object), or given explicitly with :meth:`SpectralMonitorCallback.attach`.
The handler search, the log event and the process rank are shared with the other callbacks
(:mod:`callbacks._trainer_glue`).

The callback holds no math: it finds the LoRA modules (again at every check, so that modules resized
during training are seen as they are now), hands them to the core, and routes the results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from lora_monitor._distributed import rank_and_world
from lora_monitor._io import json_safe
from lora_monitor.adapters import find_lora_modules
from lora_monitor.errors import LoraMonitorError
from lora_monitor.monitor.alerts import Alert, AlertMonitor, AlertThresholds, Severity
from lora_monitor.monitor.metrics import (
    AdapterSummary,
    BaseNormCache,
    MetricsHistory,
    ModuleMetrics,
    compute_module_metrics,
    dynamics_scalars,
    gradient_effective_ranks,
    summarize,
)

from ._trainer_glue import emit_log, find_calling_handler

logger = logging.getLogger("lora_monitor")

_LOG_LEVELS = {
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.CRITICAL: logging.CRITICAL,
}
# Columns of the W&B table of per-module metrics.
_TABLE_COLUMNS = (
    "name",
    "module_type",
    "layer_index",
    "nominal_rank",
    "effective_rank",
    "rank_utilization",
    "effective_rank_A",
    "effective_rank_B",
    "stable_rank",
    "kappa_A",
    "kappa_B",
    "sigma_max",
    "frobenius",
    "dominance",
    "update_scale",
    "gradient_effective_rank",
)


class SpectralMonitorCallback(TrainerCallback):
    """Watch the spectral health of a training LoRA adapter and report it where the Trainer reports.

    Args:
        every_n_steps: check every this many optimizer steps (plus at the start and the end of training).
        thresholds: alert thresholds, an :class:`~lora_monitor.alerts.AlertThresholds` or a dict of
            overrides (``{"dominance_warning": 0.2}``); defaults from the LoRA research agenda.
        adapter_name: the adapter to watch; by default the active one (never TRL's reference adapter).
        jsonl_name: file in ``output_dir`` that receives one JSON line per check (None: no file).
        log_alerts: send new alerts to the ``lora_monitor`` logger.
        track_gradients: at check steps, also measure the effective rank of the gradient step through
            each adapter (read in ``on_pre_optimizer_step``, where gradients exist, after clipping).

    After or during training: ``latest`` (the last check's :class:`~lora_monitor.metrics.ModuleMetrics`),
    ``latest_summary``, ``latest_scalars``, ``history`` (a :class:`~lora_monitor.metrics.MetricsHistory`)
    and ``alerts`` (every :class:`~lora_monitor.alerts.Alert` raised, each once).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        thresholds: AlertThresholds | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
        jsonl_name: str | None = "lora_monitor.jsonl",
        log_alerts: bool = True,
        track_gradients: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise LoraMonitorError(
                f"SpectralMonitorCallback: every_n_steps must be at least 1, got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.adapter_name = adapter_name
        self.jsonl_name = jsonl_name
        self.log_alerts = log_alerts
        self.track_gradients = track_gradients
        self.alert_monitor = AlertMonitor(thresholds)
        self.history = MetricsHistory()
        self.latest: list[ModuleMetrics] = []
        self.latest_summary: AdapterSummary | None = None
        self.latest_scalars: dict[str, float] = {}
        # Modules this process measured at the last check (its share when the run is distributed).
        self.local_module_count = 0
        self._base_norms = BaseNormCache()
        self._handler: CallbackHandler | None = None
        self._warned_no_handler = False
        self._pending_gradients: tuple[int, dict[str, float]] | None = None
        self._last_checked_step: int | None = None
        self._start_over()

    def _start_over(self) -> None:
        """Empty history, alerts and latest results; the base norms stay cached (the base is frozen)."""
        limits = self.alert_monitor.thresholds
        self.alert_monitor = AlertMonitor(limits)
        self.history = MetricsHistory(
            saturation_tolerance=limits.saturation_tolerance, saturation_checks=limits.saturation_checks
        )
        self.latest, self.latest_summary, self.latest_scalars = [], None, {}
        self._pending_gradients = None
        self._last_checked_step = None

    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far, in order (each condition once per module)."""
        return self.alert_monitor.alerts

    def attach(self, trainer: Any) -> SpectralMonitorCallback:
        """Bind to ``trainer`` explicitly (adding this callback to it if needed); returns ``self``."""
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._handler = trainer.callback_handler
        return self

    # ---- Trainer events ---------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._bind_to_calling_handler()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bind_to_calling_handler()
        if self.history.steps and state.global_step <= self.history.steps[-1]:
            self._start_over()  # a new run (not a resume): its history and alerts start empty
        return self._check(args, state, control, model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Gradients exist only here and in on_optimizer_step (zeroed before on_step_end); the step about to
        # end is global_step + 1.
        upcoming = state.global_step + 1
        if self.track_gradients and model is not None and upcoming % self.every_n_steps == 0:
            modules = self._my_share(find_lora_modules(model, self.adapter_name))
            self._pending_gradients = (upcoming, gradient_effective_ranks(modules))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            return self._check(args, state, control, model)
        return None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._last_checked_step != state.global_step:
            return self._check(args, state, control, model)
        return None

    # ---- One check --------------------------------------------------------------------------------------

    def _check(self, args, state, control, model):
        if model is None:
            return None
        step = state.global_step
        modules = find_lora_modules(model, self.adapter_name)
        mine = self._my_share(modules)
        local = compute_module_metrics(mine, self._base_norms)
        if self._pending_gradients is not None and self._pending_gradients[0] == step:
            for record in local:
                record.gradient_effective_rank = self._pending_gradients[1].get(record.name)
        self._pending_gradients = None
        self.local_module_count = len(local)
        metrics = _gather(local, modules)

        self.history.add(step, metrics)
        new_alerts = self.alert_monitor.update(metrics, self.history, step)
        summary = summarize(metrics)
        names = {record.name for record in metrics}
        dynamics = [d for d in self.history.all_dynamics() if d.name in names]
        scalars = {**summary.scalars(), **dynamics_scalars(dynamics)}
        scalars["lora/alerts_total"] = float(len(self.alerts))
        scalars["lora/new_alerts"] = float(len(new_alerts))
        self.latest, self.latest_summary, self.latest_scalars = metrics, summary, scalars
        self._last_checked_step = step

        if state.is_world_process_zero:
            if self.jsonl_name:
                self._write_jsonl(args, state, metrics, summary, dynamics, new_alerts)
            if self.log_alerts:
                for alert in new_alerts:
                    logger.log(_LOG_LEVELS[alert.severity], "step %d: %s", step, alert)
            self._report_to_wandb(args, state, metrics)
        return self._emit(args, state, control, scalars)

    def _my_share(self, modules):
        rank, world = rank_and_world()
        return modules[rank::world]

    def _emit(self, args, state, control, scalars: dict[str, float]):
        """The scalars as a log event of their own, so that every integration sees them (see the module doc)."""
        if self._handler is None and not self._warned_no_handler:
            logger.warning(
                "SpectralMonitorCallback is not called by a Trainer's CallbackHandler: its scalars go to "
                "state.log_history and %s only. Call callback.attach(trainer) to report them as well.",
                self.jsonl_name or "nowhere else",
            )
            self._warned_no_handler = True
        return emit_log(self._handler, args, state, control, scalars)

    def _bind_to_calling_handler(self) -> None:
        """Bind to the CallbackHandler calling this callback now; where none is found, keep an attached one."""
        handler = find_calling_handler(self)
        if handler is not None:
            self._handler = handler

    # ---- Outputs ----------------------------------------------------------------------------------------

    def _write_jsonl(self, args, state, metrics, summary, dynamics, new_alerts) -> None:
        output_dir = Path(args.output_dir or ".")
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "summary": summary.to_dict(),
            "scalars": json_safe(self.latest_scalars),
            "alerts": [alert.to_dict() for alert in new_alerts],
            "dynamics": [d.to_dict() for d in dynamics],
            "modules": [m.to_dict(json_safe=True) for m in metrics],
        }
        with open(output_dir / self.jsonl_name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")

    def _report_to_wandb(self, args, state, metrics) -> None:
        report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return
        try:
            import wandb
        except ImportError:
            return
        run = wandb.run
        if run is None:
            return
        rows = [json_safe([getattr(m, column) for column in _TABLE_COLUMNS]) for m in metrics]
        table = wandb.Table(columns=list(_TABLE_COLUMNS), data=rows)
        run.log({"lora/module_metrics": table, "train/global_step": state.global_step})
        run.summary["lora/alerts/total"] = len(self.alerts)
        for key, count in self.alert_monitor.counts.items():
            run.summary[f"lora/alerts/{key}"] = count


def _gather(local: list[ModuleMetrics], modules) -> list[ModuleMetrics]:
    """Every process's share, put back in module order (a no-op in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return local
    shares: list[list[ModuleMetrics] | None] = [None] * world
    torch.distributed.all_gather_object(shares, local)
    by_name = {record.name: record for share in shares for record in share or []}
    return [by_name[module.name] for module in modules if module.name in by_name]


__all__ = ["SpectralMonitorCallback"]
