"""InSqueezeCallback: anneal a LoRA adapter's rank while a ``transformers.Trainer`` trains it (In-Squeeze).

Trainer glue only: :class:`lora_monitor.in_squeeze.run.InSqueezeRun` plans, squeezes and keeps the records;
this binds it to the Trainer's hooks, its checkpoints and its logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.trainer_callback import ExportableState

from lora_monitor.in_squeeze import InSqueezeOptions
from lora_monitor.in_squeeze.lost_progress import LostProgress
from lora_monitor.in_squeeze.options import run_is_distributed, schedule_as_json
from lora_monitor.in_squeeze.resume import RESUME_KEY, InSqueezeResumeState, read_resume_state
from lora_monitor.in_squeeze.run import InSqueezeRun
from lora_monitor.in_squeeze.schedule import log_scalars

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
        self.run = InSqueezeRun(self.options, adapter_name)
        self.lost_progress: LostProgress | None = None  # set at the end of training if the squeezes undid it

    @property
    def target_rank(self) -> int:
        """The rank every module ends at (or the floor, with ``min_variance_retention``)."""
        return self.options.target_rank

    @property
    def adapter_name(self) -> str | None:
        """The adapter squeezed (the active one, once training starts, when none was given)."""
        return self.run.adapter_name

    @property
    def events(self) -> list[dict[str, Any]]:
        """One record per squeeze: step, rank cap, per-module ranks and retained variance, loss before/after."""
        return self.run.events

    @property
    def plan(self) -> dict[int, int]:
        """``{global step: rank cap}``: the squeezes of this run (set when training begins)."""
        return self.run.plan

    @property
    def resolved_mode(self) -> str | None:
        """``"resize"`` or ``"mask"``: what ``mode`` resolved to for this run (None before the Trainer is built)."""
        return self.run.mode

    def on_init_end(self, args, state, control, model=None, **kwargs):
        super().on_init_end(args, state, control, **kwargs)
        # Before the Trainer can load a checkpoint (which happens before on_train_begin): see the docstring.
        self.run.prepare(model, run_is_distributed(args.world_size, args.deepspeed, args.fsdp))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if not self.run.prepared:  # added after the Trainer was built (attach): no on_init_end came
            self.on_init_end(args, state, control, model=model)
        saved, same_arguments = self._saved_state(state) if state.global_step > 0 else (None, False)
        self.run.begin(
            model, optimizer, state.global_step, state.max_steps or args.max_steps, saved, same_arguments
        )

    def state(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps of this callback in ``trainer_state.json`` (see Resuming above)."""
        resume = self.run.resume_state()
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
        record = self.run.step_end(model, optimizer, state.global_step)
        if record is not None:
            # emit_log keeps control.should_log, so the Trainer's own loss log at this step is not lost.
            control = self.emit_log(args, state, control, log_scalars(record))
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.run.before_optimizer_step(model)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.run.after_optimizer_step(optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        distributed = run_is_distributed(args.world_size, args.deepspeed, args.fsdp)
        self.lost_progress = self.run.finish(model, optimizer, distributed)
        # Each process saw its own batches; one verdict, from the main one, is enough to read.
        if self.lost_progress is not None and state.is_world_process_zero:
            logger.warning(self.lost_progress.message(self.options.where, self.options.lr_scaling))
