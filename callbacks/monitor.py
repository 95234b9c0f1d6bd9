"""``SpectralMonitorCallback``: :class:`lora_monitor.monitor.Monitor` every N steps of any ``transformers.Trainer``.

Works in TRL's ``SFTTrainer`` and ``GRPOTrainer`` (they are Trainers): ``SpectralMonitorCallback(50).attach(trainer)``.

At the start, every ``every_n_steps`` optimizer steps and at the end it runs ``Monitor.check`` and routes
the record: its scalars (``lora/mean_effective_rank``, ``lora/attention/...``) as a log event of their own,
so every ``report_to`` integration and ``state.log_history`` get them (:meth:`._base.TrainerBoundCallback.emit_log`);
the record as one line of ``output_dir/lora_monitor.jsonl`` (:meth:`MonitorRecord.to_dict`); new alerts to
the ``lora_monitor`` logger; with W&B active, a table of the latest per-module metrics and alert counts
(:mod:`lora_monitor.monitor.table`). When to check is :mod:`lora_monitor.monitor.cadence`'s rule.
A failing check never stops training: it is logged (once as a warning) and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_monitor._io import append_json_line
from lora_monitor.adapters import find_lora_modules, unwrap_model
from lora_monitor.errors import LoraMonitorError, check_number
from lora_monitor.monitor import AlertThresholds, Monitor
from lora_monitor.monitor.cadence import check_due, gradient_due
from lora_monitor.monitor.log import resume_from_log
from lora_monitor.monitor.table import MODULE_TABLE_COLUMNS, alert_summary, module_table_rows

from ._base import TrainerBoundCallback

logger = logging.getLogger("lora_monitor")


class SpectralMonitorCallback(TrainerBoundCallback):
    """Watch the spectral health of a training LoRA adapter and report it where the Trainer reports.

    Args:
        every_n_steps: check every this many optimizer steps (plus at the start and the end of training).
        thresholds, adapter_name, track_gradients, intruders_every: as for
            :class:`~lora_monitor.monitor.Monitor` (``intruders_every=500``: intruder dimensions now and then).
        gradient_every_n_steps: measure the gradient rank at the first check at or after each multiple of
            this many steps, and at the last step (``max_steps``). With checks this far apart or more (the
            default ``every_n_steps=50``) that is every check after the start; with checks every step it is
            steps 10, 20, 30, ..., where it would cost about 40% of each check. The weights' metrics and
            alerts are measured at every check either way; 1 measures the gradient at every check too. A
            run stopped before ``max_steps`` (early stopping) may end on a check without it.
        jsonl_name: file in ``output_dir`` that receives one JSON line per check (None: no file).
        log_alerts: send new alerts to the ``lora_monitor`` logger.

    ``monitor`` is the :class:`~lora_monitor.monitor.Monitor`; ``latest`` (metrics), ``latest_summary``,
    ``latest_scalars``, ``history`` and ``alerts`` are its results.

    Resuming (``trainer.train(resume_from_checkpoint=...)``): the log, the logged scalars and the alerts are
    the uninterrupted run's (:mod:`lora_monitor.monitor.log`: the checks up to the checkpoint are replayed
    from ``output_dir/<jsonl_name>``, later lines dropped; the restored adapter is judged, no check recorded).
    A new run (step 0) starts the file anew; two monitors of one Trainer cannot share it.

    Its options are checked when it is built, the adapter's presence at ``on_train_begin``: a model with no
    LoRA module (or no adapter ``adapter_name``) stops the run there with a
    :class:`~lora_monitor.errors.LoraMonitorError` rather than being watched for nothing.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        thresholds: AlertThresholds | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
        jsonl_name: str | None = "lora_monitor.jsonl",
        log_alerts: bool = True,
        track_gradients: bool = True,
        intruders_every: int | None = None,
        gradient_every_n_steps: int = 10,
    ) -> None:
        check_number(every_n_steps, "SpectralMonitorCallback: every_n_steps", low=1, whole=True)
        check_number(
            gradient_every_n_steps, "SpectralMonitorCallback: gradient_every_n_steps", low=1, whole=True
        )
        if jsonl_name is not None and (
            not isinstance(jsonl_name, str)
            or not jsonl_name
            or Path(jsonl_name).is_absolute()
            or ".." in Path(jsonl_name).parts
        ):
            raise LoraMonitorError(
                f"SpectralMonitorCallback: jsonl_name must be a file name inside output_dir (or None), "
                f"got {jsonl_name!r}"
            )
        self.every_n_steps, self.jsonl_name, self.log_alerts = every_n_steps, jsonl_name, log_alerts
        self.gradient_every_n_steps = gradient_every_n_steps
        self.monitor = Monitor(thresholds, adapter_name, track_gradients, intruders_every=intruders_every)
        self._failed_once = False

    latest = property(lambda self: self.monitor.latest.metrics if self.monitor.latest else [])
    latest_summary = property(lambda self: self.monitor.latest.summary if self.monitor.latest else None)
    latest_scalars = property(lambda self: self.monitor.latest.scalars if self.monitor.latest else {})
    local_module_count = property(
        lambda self: self.monitor.latest.local_module_count if self.monitor.latest else 0
    )
    history = property(lambda self: self.monitor.history)
    alerts = property(lambda self: self.monitor.alerts)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if model is not None:  # the user's setup, not a check: a run with nothing to watch stops here
            find_lora_modules(unwrap_model(model), self.monitor.adapter_name)
        self._check_own_log(args)
        self.monitor.reset()  # a new run or a resume, in this object or a new one: the log is the memory
        if state.global_step > 0:
            # A resume: the run that was stopped had checked at this step already, or not at all; only the
            # checkpoint itself is judged here (an adapter it restored half of), as nothing else can be.
            self._resume(args, state)
            if model is not None:
                restored = self._guarded(self.monitor.verify_restored, model, state.global_step)
                self._log_alerts(restored or [], state)
            return None
        path = self._jsonl_path(args)
        if path is not None and state.is_world_process_zero and path.is_file():
            self._guarded(path.unlink)  # a new run's log starts empty: rows of an earlier run would mix in
        return self._check(args, state, control, model, kwargs.get("optimizer"))

    def _jsonl_path(self, args) -> Path | None:
        return Path(args.output_dir or ".") / self.jsonl_name if self.jsonl_name else None

    def _check_own_log(self, args) -> None:
        """Two monitors writing one file would delete and replay each other's checks: refused."""
        peers = [c for c in getattr(self._handler, "callbacks", []) if isinstance(c, SpectralMonitorCallback)]
        if self.jsonl_name and any(c is not self and c.jsonl_name == self.jsonl_name for c in peers):
            raise LoraMonitorError(
                f"two SpectralMonitorCallbacks write {self._jsonl_path(args)}: give each its own jsonl_name "
                "(or None)"
            )

    def _resume(self, args, state) -> None:
        """Take the history and the alerts back from the log's checks up to the checkpoint's step, and cut
        the log back to them (the stopped run may have checked past its checkpoint): the resumed run then
        logs, alerts and writes what the uninterrupted run would have."""
        path = self._jsonl_path(args)
        if path is None or not path.is_file():
            logger.warning(
                "SpectralMonitorCallback: resuming at step %d without the log of the checks before it (%s): "
                "the trends and the alerts start over from here",
                state.global_step,
                path or "jsonl_name=None",
            )
            return
        self._guarded(
            resume_from_log, self.monitor, path, state.global_step, rewrite=state.is_world_process_zero
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Gradients exist only here (zeroed before on_step_end); the step about to end is global_step + 1.
        step = state.global_step + 1
        last = self._is_last_step(state, step=step)  # on_step_end checks the last step whatever its number
        if (
            model is not None
            and check_due(step, self.every_n_steps, last)
            and gradient_due(step, self.every_n_steps, self.gradient_every_n_steps, last)
        ):
            self._guarded(self.monitor.record_gradients, model, step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if check_due(state.global_step, self.every_n_steps, self._is_last_step(state, control)):
            return self._check(args, state, control, model, kwargs.get("optimizer"))
        return None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The history, not the latest record: a run resumed from its last checkpoint replayed that check.
        if not self.history.steps or self.history.steps[-1] != state.global_step:
            return self._check(args, state, control, model, kwargs.get("optimizer"))
        return None

    def _check(self, args, state, control, model, optimizer):
        if model is None:
            return None
        record = self._guarded(self.monitor.check, model, state.global_step, state.epoch, optimizer=optimizer)
        if record is None:
            return None
        if state.is_world_process_zero:
            if self.jsonl_name:
                self._guarded(
                    append_json_line,
                    self._jsonl_path(args),
                    record.to_dict(json_safe=False),  # the writer makes it strict, only if it must
                )
            self._log_alerts(record.new_alerts, state)
            self._guarded(self._report_to_wandb, args, state)
        return self.emit_log(args, state, control, record.scalars)

    def _log_alerts(self, alerts, state) -> None:
        """New alerts to the ``lora_monitor`` logger, from the main process only."""
        for alert in alerts if self.log_alerts and state.is_world_process_zero else ():
            logger.log(logging.getLevelName(alert.severity.name), "step %d: %s", alert.step, alert)

    def _guarded(self, action, *arguments, **options):
        """``action(...)``, or None after logging its failure: a monitor never stops training."""
        try:
            return action(*arguments, **options)
        except Exception as error:  # whatever fails inside a check, the run goes on
            level = logging.DEBUG if self._failed_once else logging.WARNING
            name = getattr(action, "__name__", "a check")
            logger.log(level, "SpectralMonitorCallback: %s failed (%r); training goes on", name, error)
            logger.debug("SpectralMonitorCallback: the traceback of that failure", exc_info=True)
            self._failed_once = True
            return None

    def _report_to_wandb(self, args, state) -> None:
        wandb = self._active_wandb(args)
        if wandb is not None:
            self._log_table_to_wandb(
                wandb,
                "lora/module_metrics",
                MODULE_TABLE_COLUMNS,
                module_table_rows(self.latest),
                alert_summary(len(self.alerts), self.monitor.alert_counts),
                extra={"train/global_step": state.global_step},
            )


__all__ = ["SpectralMonitorCallback"]
