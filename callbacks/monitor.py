"""``SpectralMonitorCallback``: :class:`lora_monitor.monitor.Monitor` every N steps of any ``transformers.Trainer``.

Works in TRL's ``SFTTrainer`` and ``GRPOTrainer`` (they are Trainers): ``SpectralMonitorCallback(50).attach(trainer)``.

At the start, every ``every_n_steps`` optimizer steps and at the end it runs ``Monitor.check`` and routes
the record: its scalars (``lora/mean_effective_rank``, ``lora/attention/...``) as a log event of their own,
so every ``report_to`` integration and ``state.log_history`` get them (:func:`._trainer_glue.emit_log`);
the record as one line of ``output_dir/lora_monitor.jsonl`` (:meth:`MonitorRecord.to_dict`); new alerts to
the ``lora_monitor`` logger; with W&B active, a table of the latest per-module metrics and alert counts.
A failing check never stops training: it is logged (once as a warning) and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_monitor._io import append_json_line, json_safe
from lora_monitor.adapters import find_lora_modules, unwrap_model
from lora_monitor.errors import LoraMonitorError, check_number
from lora_monitor.monitor import AlertThresholds, Monitor

from ._trainer_glue import active_wandb, emit_log, find_calling_handler, is_last_step

logger = logging.getLogger("lora_monitor")
_TABLE_COLUMNS = (
    *("name", "module_type", "block", "layer_index", "nominal_rank", "effective_rank", "rank_utilization"),
    *("effective_rank_A", "effective_rank_B", "stable_rank", "kappa_A", "kappa_B", "sigma_max", "frobenius"),
    *("dominance", "update_scale", "gradient_effective_rank"),
)


class SpectralMonitorCallback(TrainerCallback):
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
        self._handler, self._failed_once, self._warned_no_handler = None, False, False

    latest = property(lambda self: self.monitor.latest.metrics if self.monitor.latest else [])
    latest_summary = property(lambda self: self.monitor.latest.summary if self.monitor.latest else None)
    latest_scalars = property(lambda self: self.monitor.latest.scalars if self.monitor.latest else {})
    local_module_count = property(
        lambda self: self.monitor.latest.local_module_count if self.monitor.latest else 0
    )
    history = property(lambda self: self.monitor.history)
    alerts = property(lambda self: self.monitor.alerts)

    def attach(self, trainer: Any) -> SpectralMonitorCallback:
        """Bind to ``trainer`` (adding this callback to it if needed); returns ``self``. The recommended way."""
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._handler = trainer.callback_handler
        return self

    def on_init_end(self, args, state, control, **kwargs):
        self._handler = find_calling_handler(self) or self._handler

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._handler = find_calling_handler(self) or self._handler
        if model is not None:  # the user's setup, not a check: a run with nothing to watch stops here
            find_lora_modules(unwrap_model(model), self.monitor.adapter_name)
        if self.history.steps and state.global_step <= self.history.steps[-1]:
            self.monitor.reset()  # a new run (not a resume): its history and alerts start empty
        return self._check(args, state, control, model, kwargs.get("optimizer"))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Gradients exist only here (zeroed before on_step_end); the step about to end is global_step + 1.
        step = state.global_step + 1
        last = 0 < state.max_steps <= step  # on_step_end checks the last step whatever its number
        if model is not None and (step % self.every_n_steps == 0 or last) and self._gradient_due(step, last):
            self._guarded(self.monitor.record_gradients, model, step)

    def _gradient_due(self, step: int, last: bool) -> bool:
        """Whether the check at ``step`` measures the gradient rank: the last step, or the first check at or
        after a multiple of ``gradient_every_n_steps`` (the check before it, ``every_n_steps`` earlier, lies
        before that multiple). Step numbers alone decide: every process of a distributed run decides alike
        (under FSDP2 the measurement is a collective), and a resumed run measures where it would have."""
        span = self.gradient_every_n_steps
        return last or step // span != (step - self.every_n_steps) // span

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 or is_last_step(state, control):
            return self._check(args, state, control, model, kwargs.get("optimizer"))
        return None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        latest = self.monitor.latest
        if latest is None or latest.step != state.global_step:
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
                    Path(args.output_dir or ".") / self.jsonl_name,
                    record.to_dict(json_safe=False),  # the writer makes it strict, only if it must
                )
            for alert in record.new_alerts if self.log_alerts else ():
                logger.log(logging.getLevelName(alert.severity.name), "step %d: %s", record.step, alert)
            self._guarded(self._report_to_wandb, args, state)
        if self._handler is None and not self._warned_no_handler:
            logger.warning(
                "SpectralMonitorCallback: not called by a Trainer's CallbackHandler, so its scalars go to "
                "state.log_history only; call callback.attach(trainer) to report them as well."
            )
            self._warned_no_handler = True
        return emit_log(self._handler, args, state, control, record.scalars)

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
        wandb = active_wandb(args)
        if wandb is not None:
            run = wandb.run
            rows = [json_safe([getattr(m, column) for column in _TABLE_COLUMNS]) for m in self.latest]
            table = wandb.Table(columns=list(_TABLE_COLUMNS), data=rows)
            run.log({"lora/module_metrics": table, "train/global_step": state.global_step})
            run.summary["lora/alerts/total"] = len(self.alerts)
            for key, count in self.monitor.alert_counts.items():
                run.summary[f"lora/alerts/{key}"] = count


__all__ = ["SpectralMonitorCallback"]
