"""InSqueezeCallback: anneal a LoRA adapter's rank while a ``transformers.Trainer`` trains it (In-Squeeze).

The Trainer glue only: the schedule says when and to which rank; :mod:`lora_monitor.resize` does the work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from lora_monitor._distributed import rank_and_world
from lora_monitor.adapters import find_lora_modules
from lora_monitor.errors import LoraMonitorError
from lora_monitor.in_squeeze.resize import (
    METHODS,
    OPTIMIZER_STATES,
    compact_masks,
    current_ranks,
    install_rank_hooks,
    squeeze_model,
    unwrap_optimizer,
)

from ._trainer_glue import emit_log, find_calling_handler

SCHEDULES = ("geometric", "linear")
LOG_PREFIX = "in_squeeze/"


def _resolve_step(value: int | float, max_steps: int, what: str) -> int:
    """A step given as an int (a step number) or a float in (0, 1) (a fraction of ``max_steps``)."""
    if isinstance(value, bool):
        raise LoraMonitorError(f"InSqueezeCallback: {what} must be a step or a fraction, got {value!r}")
    if isinstance(value, float) and 0 < value < 1:
        if max_steps <= 0:
            raise LoraMonitorError(
                f"InSqueezeCallback: {what}={value} is a fraction but max_steps is unknown"
            )
        return max(1, round(value * max_steps))
    if isinstance(value, int | float) and value >= 1 and float(value).is_integer():
        return int(value)
    raise LoraMonitorError(
        f"InSqueezeCallback: {what} must be a step number (int ≥ 1) or a fraction in (0, 1), got {value!r}"
    )


def plan_schedule(
    source_rank: int,
    target_rank: int,
    schedule: str | Sequence[tuple[int | float, int]],
    start_step: int,
    end_step: int,
    max_steps: int = 0,
) -> dict[int, int]:
    """``{global step: rank cap}`` of a squeeze schedule (steps after which the cap applies).

    ``geometric`` halves the rank at evenly spaced steps from ``start_step`` to ``end_step`` (16 → 8 → 4);
    ``linear`` lowers it one rank at a time, evenly over the same span; an explicit list of
    ``(step, rank)`` is taken as given (steps as numbers or fractions of ``max_steps``).
    """
    if not isinstance(schedule, str):
        plan: dict[int, int] = {}
        for entry in schedule:
            step, rank = entry
            plan[_resolve_step(step, max_steps, "schedule step")] = int(rank)
        if any(rank < 1 for rank in plan.values()):
            raise LoraMonitorError(f"InSqueezeCallback: schedule ranks must be at least 1, got {schedule}")
        return dict(sorted(plan.items()))
    if schedule not in SCHEDULES:
        raise LoraMonitorError(
            f"InSqueezeCallback: schedule must be one of {SCHEDULES} or a list, got {schedule!r}"
        )
    if end_step < start_step:
        raise LoraMonitorError(f"InSqueezeCallback: end_step {end_step} comes before start_step {start_step}")
    if target_rank >= source_rank:
        return {}
    if schedule == "geometric":
        caps = []
        rank = source_rank
        while rank // 2 > target_rank:
            rank //= 2
            caps.append(rank)
        caps.append(target_rank)
        if len(caps) == 1:
            return {end_step: target_rank}
        span = end_step - start_step
        return {round(start_step + span * i / (len(caps) - 1)): cap for i, cap in enumerate(caps)}
    plan = {}
    span = end_step - start_step + 1
    last = source_rank
    for step in range(start_step, end_step + 1):
        rank = round(source_rank + (target_rank - source_rank) * (step - start_step + 1) / span)
        if rank < last:
            plan[step] = rank
            last = rank
    return plan


def _is_distributed(args: Any) -> bool:
    # The process group, or the Trainer's own view (DeepSpeed/FSDP set up before the group may exist).
    _, world = rank_and_world()
    return (
        world > 1
        or getattr(args, "world_size", 1) > 1
        or bool(getattr(args, "deepspeed", None))
        or bool(getattr(args, "fsdp", None))
    )


class InSqueezeCallback(TrainerCallback):
    """Shrink a LoRA adapter's rank during training: train at a high rank, squeeze to ``target_rank``.

    Pass it to any ``Trainer`` (TRL's ``SFTTrainer``/``GRPOTrainer`` included)::

        trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                          callbacks=[InSqueezeCallback(target_rank=4, start_step=0.3, end_step=0.7)])

    Args:
        target_rank: the rank every module ends at (or the floor, with ``min_variance_retention``).
        schedule: ``"geometric"`` (r → r/2 → ... → target at evenly spaced steps), ``"linear"`` (one rank
            at a time, evenly spaced), or a list of ``(step, rank)``. The steps after the last squeeze are
            the paper's Cont-Squeeze: training goes on at the target rank.
        start_step, end_step: first and last squeeze; an int is a step number, a float in (0, 1) a
            fraction of ``max_steps``.
        method: ``"qr"`` (exact factored SVD) or ``"rsvd"`` (randomized SVD, with ``rsvd_oversample``
            extra probes and ``rsvd_power_iters`` power iterations).
        optimizer_state: ``"project"`` carries Adam's moments through the maps that made the new factors
            (second moments by the squared maps, step counts kept); ``"reset"`` drops them.
        mode: ``"resize"`` (new, smaller parameters), ``"mask"`` (same shapes, dropped directions zeroed
            and held at zero: the only choice under DDP, FSDP and DeepSpeed), or ``"auto"``: mask when the
            run is distributed, resize otherwise.
        min_variance_retention: if set, each module keeps the smallest rank that retains this fraction of
            its ``‖ΔW‖²_F``, never fewer than the schedule's rank: a per-module target.
        rewarmup_steps: after each squeeze, ramp the learning rate linearly back up over this many steps.
        adapter_name: the adapter to squeeze (default: the active one; TRL's frozen ``ref`` never).

    Each squeeze is logged as ``Trainer.log`` would (so it reaches ``report_to`` and ``state.log_history``)
    under ``in_squeeze/*`` keys: the new mean/min/max rank, the retained variance, the loss on the step's batch
    just before and just after the squeeze (``loss_jump``), and the seconds it took. ``callback.events``
    keeps one record per squeeze with the per-module ranks.

    Saving: every adapter the Trainer writes (checkpoints and ``save_model``) has the reduced rank and
    reloads with ``PeftModel.from_pretrained``. In mask mode the live parameters keep their shapes, but
    ``state_dict()`` hands out the kept directions only; at the end of a single-process run masked modules
    are compacted into really smaller ones.

    Resuming: build the model exactly as for the first run (at the source rank), pass a new
    ``InSqueezeCallback`` with the same arguments, and call ``trainer.train(resume_from_checkpoint=...)``.
    The Trainer loads the checkpoint's adapter before it builds the optimizer and loads the optimizer's
    state, and before any ``on_train_begin``; so the callback hooks the model's state-dict loading when the
    Trainer is created (``on_init_end``): a checkpoint whose factors are smaller than the fresh model's gets
    room made for it first (resize: new parameters of the saved rank, scale kept; mask: zero padding and
    the mask restored). The optimizer is then built on the right shapes, its saved moments load, and the
    squeezes scheduled after the checkpoint's step follow as planned (those before it are already in the
    checkpoint). The callback keeps no state of its own in the checkpoint, so
    ``restore_callback_states_from_checkpoint`` does not matter to it. A callback added with
    ``trainer.add_callback`` after the Trainer was created misses ``on_init_end``: pass it in
    ``callbacks=[...]`` when you mean to resume.
    """

    def __init__(
        self,
        target_rank: int = 8,
        schedule: str | Sequence[tuple[int | float, int]] = "geometric",
        start_step: int | float = 0.3,
        end_step: int | float = 0.7,
        method: str = "qr",
        optimizer_state: str = "project",
        mode: str = "auto",
        min_variance_retention: float | None = None,
        rewarmup_steps: int = 0,
        adapter_name: str | None = None,
        rsvd_oversample: int = 10,
        rsvd_power_iters: int = 2,
    ) -> None:
        if (
            isinstance(target_rank, bool)
            or not isinstance(target_rank, int | float)
            or not float(target_rank).is_integer()
            or target_rank < 1
        ):
            raise LoraMonitorError(
                f"InSqueezeCallback: target_rank must be an integer ≥ 1, got {target_rank!r}"
            )
        if method not in METHODS:
            raise LoraMonitorError(f"InSqueezeCallback: method must be one of {METHODS}, got {method!r}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise LoraMonitorError(
                f"InSqueezeCallback: optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}"
            )
        if mode not in ("auto", "resize", "mask"):
            raise LoraMonitorError(
                f"InSqueezeCallback: mode must be 'auto', 'resize' or 'mask', got {mode!r}"
            )
        if min_variance_retention is not None and (
            isinstance(min_variance_retention, bool)
            or not isinstance(min_variance_retention, int | float)
            or not 0 < min_variance_retention <= 1
        ):
            raise LoraMonitorError(
                f"InSqueezeCallback: min_variance_retention must be in (0, 1], got {min_variance_retention}"
            )
        if rewarmup_steps < 0:
            raise LoraMonitorError(f"InSqueezeCallback: rewarmup_steps must be ≥ 0, got {rewarmup_steps}")
        self.target_rank = int(target_rank)
        self.schedule = schedule
        self.start_step = start_step
        self.end_step = end_step
        self.method = method
        self.optimizer_state = optimizer_state
        self.mode = mode
        self.min_variance_retention = min_variance_retention
        self.rewarmup_steps = int(rewarmup_steps)
        self.adapter_name = adapter_name
        self.rsvd_oversample = rsvd_oversample
        self.rsvd_power_iters = rsvd_power_iters
        self.events: list[dict[str, Any]] = []
        self.plan: dict[int, int] = {}
        self.resolved_mode: str | None = None
        self._handler: CallbackHandler | None = None
        self._source_rank: int | None = None
        self._last_inputs: dict[str, Any] | None = None
        self._probing = False
        self._input_hook: Any = None
        self._rewarm_from: int | None = None
        self._unscaled_lrs: list[float] | None = None

    # ---- set-up -------------------------------------------------------------------------------------

    def _resolve_mode(self, args: Any) -> str:
        distributed = _is_distributed(args)
        if self.mode == "auto":
            return "mask" if distributed else "resize"
        if self.mode == "resize" and distributed:
            raise LoraMonitorError(
                "InSqueezeCallback: mode='resize' cannot change the parameter set of a distributed "
                "(DDP/FSDP/DeepSpeed) run; use mode='mask' or 'auto'"
            )
        return self.mode

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.resolved_mode = self._resolve_mode(args)
        records = find_lora_modules(model, self.adapter_name)
        self.adapter_name = records[0].adapter_name
        self._source_rank = max(record.rank for record in records)
        # Before the Trainer can load a checkpoint (which happens before on_train_begin): see the docstring.
        install_rank_hooks(model, adapter_name=self.adapter_name, mode=self.resolved_mode)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resolved_mode is None:
            self.on_init_end(args, state, control, model=model)
        # Searched at every train begin so that a callback reused by a second Trainer logs through it.
        self._handler = find_calling_handler(self) or self._handler
        max_steps = state.max_steps or args.max_steps
        start = _resolve_step(self.start_step, max_steps, "start_step")
        end = _resolve_step(self.end_step, max_steps, "end_step")
        self.plan = plan_schedule(self._source_rank, self.target_rank, self.schedule, start, end, max_steps)
        if self._input_hook is None:
            self._input_hook = model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True)

    def attach(self, trainer: Any) -> InSqueezeCallback:
        """Route the squeeze logs through ``trainer``'s callbacks explicitly (normally found by itself)."""
        self._handler = trainer.callback_handler
        return self

    def _remember_inputs(self, module, args, kwargs):
        # A reference to the latest training batch, so the loss jump of a squeeze is measured on it.
        if not self._probing and module.training and kwargs.get("labels") is not None:
            self._last_inputs = kwargs

    # ---- the squeeze --------------------------------------------------------------------------------

    def _probe_loss(self, model) -> float:
        if self._last_inputs is None:
            return math.nan
        was_training = model.training
        self._probing = True
        try:
            model.eval()
            with torch.no_grad():
                output = model(**self._last_inputs)
            loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
            return float(loss) if loss is not None else math.nan
        finally:
            self._probing = False
            model.train(was_training)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step in self.plan:
            control = self._squeeze(args, state, control, model, optimizer, self.plan[step])
        self._rewarm(step, optimizer)
        return control

    def _squeeze(self, args, state, control, model, optimizer, cap: int):
        began = time.perf_counter()
        loss_before = self._probe_loss(model)
        squeezed_at = time.perf_counter()
        events = squeeze_model(
            model,
            cap,
            adapter_name=self.adapter_name,
            method=self.method,
            optimizer=optimizer,
            optimizer_state=self.optimizer_state,
            mode=self.resolved_mode,
            min_variance_retention=self.min_variance_retention,
            rsvd_oversample=self.rsvd_oversample,
            rsvd_power_iters=self.rsvd_power_iters,
            seed=state.global_step,
        )
        squeeze_seconds = time.perf_counter() - squeezed_at
        loss_after = self._probe_loss(model)
        if not events:
            return control
        ranks = current_ranks(model, self.adapter_name)
        retained = [e.retained_variance for e in events if not math.isnan(e.retained_variance)]
        record = {
            "step": state.global_step,
            "rank_cap": cap,
            "ranks": ranks,
            "modules_squeezed": len(events),
            "retained_variance": {e.name: e.retained_variance for e in events},
            "loss_before": loss_before,
            "loss_after": loss_after,
            "squeeze_seconds": squeeze_seconds,
            "seconds": time.perf_counter() - began,
        }
        self.events.append(record)
        metrics = {
            f"{LOG_PREFIX}rank_mean": sum(ranks.values()) / len(ranks),
            f"{LOG_PREFIX}rank_min": float(min(ranks.values())),
            f"{LOG_PREFIX}rank_max": float(max(ranks.values())),
            f"{LOG_PREFIX}modules_squeezed": float(len(events)),
            f"{LOG_PREFIX}retained_variance_mean": sum(retained) / len(retained) if retained else math.nan,
            f"{LOG_PREFIX}retained_variance_min": min(retained) if retained else math.nan,
            f"{LOG_PREFIX}loss_before": loss_before,
            f"{LOG_PREFIX}loss_after": loss_after,
            f"{LOG_PREFIX}loss_jump": loss_after - loss_before,
            f"{LOG_PREFIX}seconds": squeeze_seconds,
        }
        if self.rewarmup_steps:
            self._rewarm_from = state.global_step
        # No loss to probe (a trainer that computes it outside the model, as GRPO does): leave it out.
        metrics = {key: value for key, value in metrics.items() if not math.isnan(value)}
        # emit_log keeps control.should_log, so the Trainer's own loss log at this step is not lost.
        logged = emit_log(self._handler, args, state, control, metrics)
        return logged if logged is not None else control

    # ---- learning-rate re-warm-up -------------------------------------------------------------------

    def _rewarm(self, step: int, optimizer) -> None:
        # Scale the LR of the next optimizer steps; on_optimizer_step puts the scheduler's value back, so
        # that schedulers which build on the current LR never see the scaled one.
        if self._rewarm_from is None or optimizer is None:
            return
        done = step - self._rewarm_from
        if done >= self.rewarmup_steps:
            self._rewarm_from = None
            return
        factor = (done + 1) / (self.rewarmup_steps + 1)
        groups = unwrap_optimizer(optimizer).param_groups
        self._unscaled_lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._unscaled_lrs is not None and optimizer is not None:
            for group, lr in zip(unwrap_optimizer(optimizer).param_groups, self._unscaled_lrs, strict=True):
                group["lr"] = lr
            self._unscaled_lrs = None

    # ---- the end ------------------------------------------------------------------------------------

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        self._last_inputs = None
        # A single process can drop the masked directions for real: smaller model, same function.
        if self.resolved_mode == "mask" and not _is_distributed(args):
            compact_masks(model, adapter_name=self.adapter_name, optimizer=optimizer)
