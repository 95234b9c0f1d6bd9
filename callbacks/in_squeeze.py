"""InSqueezeCallback: anneal a LoRA adapter's rank while a ``transformers.Trainer`` trains it (In-Squeeze).

Trainer glue only: :mod:`lora_monitor.in_squeeze` plans, squeezes and keeps the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.trainer_callback import ExportableState

from lora_monitor.adapters import find_lora_modules
from lora_monitor.in_squeeze import (
    InSqueezeOptions,
    LearningRateRewarmup,
    LossProbe,
    compact_after_training,
    current_ranks,
    install_rank_hooks,
)
from lora_monitor.in_squeeze import schedule as squeeze_schedule
from lora_monitor.in_squeeze.lost_progress import LostProgress, LostProgressWatch
from lora_monitor.in_squeeze.options import run_is_distributed, schedule_as_json
from lora_monitor.in_squeeze.resume import RESUME_KEY, InSqueezeResumeState, read_resume_state
from lora_monitor.in_squeeze.step_scaling import SqueezedStepScaling

from ._base import TrainerBoundCallback, logger


class InSqueezeCallback(TrainerBoundCallback, ExportableState):
    """Shrink a LoRA adapter's rank during training: train at a high rank, squeeze to ``target_rank``.

    Pass it to any ``Trainer`` (TRL's ``SFTTrainer``/``GRPOTrainer`` included)::

        trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                          callbacks=[InSqueezeCallback(target_rank=4, start_step=0.3, end_step=0.7)])

    or add it to a Trainer already built: ``InSqueezeCallback(target_rank=4).attach(trainer)`` (not for a
    resumed run: see Resuming below).

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
        lr_scaling: ``"rank"`` (default) scales each squeezed module's optimizer step by
            ``r_source/r_now``, so that it keeps learning as fast as at the source rank (with
            ``lora_alpha = r`` a lower rank learns proportionally slower; see
            :mod:`lora_monitor.in_squeeze.step_scaling` and ``bench/EVIDENCE.md``); ``"sqrt"`` by its square
            root (for rsLoRA-like scaling); ``"none"`` leaves the steps alone.
        adapter_name: the adapter to squeeze (default: the active one; TRL's frozen ``ref`` never).

    Each squeeze is logged as ``Trainer.log`` would (to ``report_to`` and ``state.log_history``) under
    ``in_squeeze/*``: mean/min/max rank, retained variance, the loss on the step's batch before and after
    (``loss_jump``), seconds. ``callback.events`` keeps one record per squeeze with the per-module ranks.

    Lost progress: at the end of training, when the training loss over the steps after the last squeeze is
    significantly above its level just before the first one (the squeezed adapter undid what the source had
    learned, or the target rank is too small), a warning says so with the numbers and what to try, and
    ``callback.lost_progress`` holds the finding (:mod:`lora_monitor.in_squeeze.lost_progress`; None when
    the run kept improving, or when the model returns no loss, as under GRPO).

    Saving: every adapter the Trainer writes (checkpoints, ``save_model``) has the reduced rank and reloads
    with ``PeftModel.from_pretrained``; mask mode keeps the live shapes but saves the kept directions only,
    and a single-process run compacts masked modules into really smaller ones at the end.

    Resuming: build the model exactly as for the first run (at the source rank), pass a new
    ``InSqueezeCallback`` with the same arguments in ``callbacks=[...]`` (not ``add_callback``/``attach``: its
    hooks go in at ``on_init_end``, before the Trainer loads the checkpoint), and call
    ``trainer.train(resume_from_checkpoint=...)``. The resumed run is the uninterrupted run: every
    checkpoint's ``trainer_state.json`` keeps what the callback holds that changes training (the source
    ranks the step scaling divides by, the plan of squeezes, a re-warm-up ramp in progress, the per-module
    ranks, the lost-progress check's losses), and ``on_train_begin`` restores it, whatever ``restore_callback_states_from_checkpoint`` says
    (with it set, the Trainer replaces this object by a new one built from the saved arguments, so read
    ``events`` from the callback in ``trainer.callback_handler.callbacks``). A model that does not come back
    at the checkpoint's ranks stops the run with a :class:`~lora_monitor.errors.LoraMonitorError`.
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
        lr_scaling: str = "rank",
    ) -> None:
        self.options = InSqueezeOptions(
            target_rank, schedule, start_step, end_step, method, optimizer_state, mode,
            min_variance_retention, rewarmup_steps, rsvd_oversample, rsvd_power_iters, lr_scaling,
            where="InSqueezeCallback",
        )  # fmt: skip
        # The arguments as JSON, for the checkpoint (a Trainer that restores callbacks rebuilds one from them).
        self._arguments = dict(
            target_rank=target_rank,
            schedule=schedule_as_json(schedule),
            start_step=start_step, end_step=end_step, method=method, optimizer_state=optimizer_state,
            mode=mode, min_variance_retention=min_variance_retention, rewarmup_steps=rewarmup_steps,
            adapter_name=adapter_name, rsvd_oversample=rsvd_oversample, rsvd_power_iters=rsvd_power_iters,
            lr_scaling=lr_scaling,
        )  # fmt: skip
        self.adapter_name = adapter_name
        self.events: list[dict[str, Any]] = []
        self.plan: dict[int, int] = {}
        self.resolved_mode: str | None = None
        self._source_rank: int | None = None
        self._model: Any = None
        self._probe = LossProbe()
        self._rewarmup = LearningRateRewarmup(self.options.rewarmup_steps)
        self._lost_progress = LostProgressWatch()
        self.lost_progress: LostProgress | None = None  # set at the end of training if the squeezes undid it

    @property
    def target_rank(self) -> int:
        """The rank every module ends at (or the floor, with ``min_variance_retention``)."""
        return self.options.target_rank

    def on_init_end(self, args, state, control, model=None, **kwargs):
        super().on_init_end(args, state, control, **kwargs)
        self.resolved_mode = self.options.resolve_mode(
            run_is_distributed(args.world_size, args.deepspeed, args.fsdp)
        )
        records = find_lora_modules(model, self.adapter_name)
        self.adapter_name = records[0].adapter_name
        self._source_rank = max(record.rank for record in records)
        self._step_scaling = SqueezedStepScaling(self.options.lr_scaling, self.adapter_name)
        self._step_scaling.factors(model)  # the source ranks, before any squeeze
        # Before the Trainer can load a checkpoint (which happens before on_train_begin): see the docstring.
        install_rank_hooks(model, adapter_name=self.adapter_name, mode=self.resolved_mode)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.resolved_mode is None:  # added after the Trainer was built (attach): no on_init_end came
            self.on_init_end(args, state, control, model=model)
        self._model = model
        saved, same_arguments = self._saved_state(state) if state.global_step > 0 else (None, False)
        if saved is not None:  # a resume: what the checkpoint kept, not what the loaded model shows
            source_rank = saved.restore_into(
                model, optimizer, state.global_step, adapter_name=self.adapter_name,
                step_scaling=self._step_scaling, rewarmup=self._rewarmup, where=self.options.where,
                lost_progress=self._lost_progress,
            )  # fmt: skip
            self._source_rank = source_rank or self._source_rank  # None: the checkpoint kept no source ranks
        if saved is not None and same_arguments:  # the plan made at the start, whatever max_steps is now
            self.plan = dict(saved.plan)
        else:
            self.plan = squeeze_schedule.plan_for(
                self.options, self._source_rank, state.max_steps or args.max_steps
            )
        squeeze_schedule.check_something_to_squeeze(
            self.plan, self._source_rank, self.options, self.adapter_name
        )
        self._probe.attach(model)
        self._lost_progress.attach(model)

    def state(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps of this callback in ``trainer_state.json`` (see Resuming above)."""
        step_scaling = getattr(self, "_step_scaling", None)  # set at on_init_end
        resume = InSqueezeResumeState(
            source_ranks=(step_scaling.source_ranks if step_scaling else None) or {},
            plan=self.plan,
            rewarmup=self._rewarmup.state(),
            ranks=current_ranks(self._model, self.adapter_name) if self._model is not None else None,
            lost_progress=self._lost_progress.state(),
        )
        return {"args": dict(self._arguments), "attributes": {}, RESUME_KEY: resume.to_json()}

    def _saved_state(self, state: Any) -> tuple[InSqueezeResumeState | None, bool]:
        """This callback's state in the checkpoint's ``trainer_state.json`` (None in one written without it),
        and whether it was saved with the same arguments as this callback's."""
        peers = [c for c in getattr(self._handler, "callbacks", []) if type(c) is type(self)]
        index = next((i for i, c in enumerate(peers) if c is self), 0)
        return read_resume_state(
            state.stateful_callbacks, type(self).__name__, index, max(len(peers), 1), self._arguments,
            f"{self.options.where}: trainer_state.json",
        )  # fmt: skip

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        record = None
        if step in self.plan:
            record = squeeze_schedule.squeeze_and_record(
                model, optimizer, self.plan[step], step, self.options,
                adapter_name=self.adapter_name, mode=self.resolved_mode, probe=self._probe,
            )  # fmt: skip
            if record is not None:
                self.events.append(record)
                self._rewarmup.start(step)
                # emit_log keeps control.should_log, so the Trainer's own loss log at this step is not lost.
                control = self.emit_log(args, state, control, squeeze_schedule.log_scalars(record))
        self._rewarmup.scale(step, optimizer)
        self._lost_progress.step_end(step, squeezed=record is not None)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._step_scaling.before_step(model)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._step_scaling.after_step()
        self._rewarmup.restore(optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._probe.detach()
        self._lost_progress.detach()
        # Each process saw its own batches; one verdict, from the main one, is enough to read.
        self.lost_progress = self._lost_progress.finding()
        if self.lost_progress is not None and state.is_world_process_zero:
            logger.warning(self.lost_progress.message(self.options.where, self.options.lr_scaling))
        compact_after_training(
            model, self.resolved_mode, adapter_name=self.adapter_name, optimizer=optimizer,
            distributed=run_is_distributed(args.world_size, args.deepspeed, args.fsdp),
        )  # fmt: skip
