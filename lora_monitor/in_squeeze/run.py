"""One training run's In-Squeeze, step by step, without the Trainer.

:class:`InSqueezeRun` holds everything that lives from the first step to the last: the plan of squeezes, the
per-module source ranks the step scaling divides by, the re-warm-up ramp, the loss probe, the lost-progress
watch and the record of each squeeze. ``InSqueezeCallback`` drives it from the Trainer's hooks; any training
loop can drive it the same way::

    run = InSqueezeRun(InSqueezeOptions(target_rank=8))
    run.prepare(model, distributed=False)  # before a checkpoint is loaded into the model
    run.begin(model, optimizer, step=0, max_steps=100)
    for step in range(1, 101):
        loss = model(**batch).loss
        loss.backward()
        run.before_optimizer_step(model)
        optimizer.step()
        run.after_optimizer_step(optimizer)
        optimizer.zero_grad()
        record = run.step_end(model, optimizer, step)  # a dict when a squeeze happened at this step
    finding = run.finish(model, optimizer, distributed=False)  # LostProgress, or None
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import find_lora_modules
from ..errors import LoraMonitorError
from .hooks import install_rank_hooks
from .loss_probe import LossProbe
from .lost_progress import LostProgress, LostProgressWatch
from .options import InSqueezeOptions
from .resize import compact_after_training, current_ranks
from .resume import InSqueezeResumeState
from .rewarmup import LearningRateRewarmup
from .schedule import check_something_to_squeeze, plan_for, squeeze_and_record
from .step_scaling import SqueezedStepScaling


class InSqueezeRun:
    """In-Squeeze over one run of a PEFT model: call the methods in the order of the module's example.

    Attributes a caller reads: :attr:`plan` (``{step: rank cap}``, set by :meth:`begin`), :attr:`events` (one
    record per squeeze, see :func:`~.schedule.squeeze_and_record`), :attr:`mode` (``"resize"`` or
    ``"mask"``, set by :meth:`prepare`) and :attr:`adapter_name` (the adapter squeezed).
    """

    def __init__(self, options: InSqueezeOptions, adapter_name: str | None = None) -> None:
        self.options = options
        self.adapter_name = adapter_name
        self.mode: str | None = None
        self.plan: dict[int, int] = {}
        self.events: list[dict[str, Any]] = []
        self.step_scaling: SqueezedStepScaling | None = None
        self.rewarmup = LearningRateRewarmup(options.rewarmup_steps)
        self.lost_progress_watch = LostProgressWatch()
        self.probe = LossProbe()
        self._model: nn.Module | None = None

    @property
    def source_rank(self) -> int | None:
        """The largest rank before any squeeze: read at :meth:`prepare`, or the checkpoint's after a resume
        (the step scaling's source ranks, which a resume restores; None before :meth:`prepare`)."""
        ranks = self.step_scaling.source_ranks if self.step_scaling is not None else None
        return max(ranks.values()) if ranks else None

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare` has run."""
        return self.mode is not None

    def prepare(self, model: nn.Module, distributed: bool) -> None:
        """Before any checkpoint is loaded into ``model``: pick the mode (mask when ``distributed``, under
        ``mode="auto"``), read the source ranks and install the hooks that save and load squeezed factors."""
        self.mode = self.options.resolve_mode(distributed)
        records = find_lora_modules(model, self.adapter_name)
        self.adapter_name = records[0].adapter_name
        self.step_scaling = SqueezedStepScaling(self.options.lr_scaling, self.adapter_name)
        self.step_scaling.factors(model)  # the source ranks, before any squeeze
        install_rank_hooks(model, adapter_name=self.adapter_name, mode=self.mode)

    def begin(
        self,
        model: nn.Module,
        optimizer: Any | None,
        step: int,
        max_steps: int,
        saved: InSqueezeResumeState | None = None,
        keep_saved_plan: bool = False,
    ) -> None:
        """Start (``step`` 0) or resume (``saved``: what a checkpoint kept, once it is loaded into ``model``
        and ``optimizer``) a run of ``max_steps`` steps. ``keep_saved_plan``: the checkpoint was written
        with the same options, so the plan made at the start holds whatever ``max_steps`` is now. A plan
        that can never squeeze, or a model that does not hold the checkpoint's ranks, is a
        :class:`~lora_monitor.errors.LoraMonitorError`, as is a run not prepared first."""
        if not self.prepared:
            raise LoraMonitorError(
                "InSqueezeRun: call prepare(model, distributed) before begin(), before any checkpoint is loaded"
            )
        self._model = model
        if saved is not None:  # what the checkpoint kept, not what the loaded model shows
            saved.restore_into(
                model, optimizer, step, adapter_name=self.adapter_name, step_scaling=self.step_scaling,
                rewarmup=self.rewarmup, where=self.options.where, lost_progress=self.lost_progress_watch,
            )  # fmt: skip
        if saved is not None and keep_saved_plan:
            self.plan = dict(saved.plan)
        else:
            self.plan = plan_for(self.options, self.source_rank, max_steps)
        check_something_to_squeeze(self.plan, self.source_rank, self.options, self.adapter_name)
        self.probe.attach(model)
        self.lost_progress_watch.attach(model)

    def resume_state(self) -> InSqueezeResumeState:
        """What a checkpoint must keep for a resumed run to be this run (:mod:`.resume`)."""
        return InSqueezeResumeState(
            source_ranks=(self.step_scaling.source_ranks if self.step_scaling else None) or {},
            plan=self.plan,
            rewarmup=self.rewarmup.state(),
            ranks=current_ranks(self._model, self.adapter_name) if self._model is not None else None,
            lost_progress=self.lost_progress_watch.state(),
        )

    def step_end(self, model: nn.Module, optimizer: Any | None, step: int) -> dict[str, Any] | None:
        """After optimizer step ``step``: squeeze if the plan says so (the record, also appended to
        :attr:`events`; None when nothing was squeezed), then scale the next step's learning rate while a
        re-warm-up ramp runs."""
        record = None
        if step in self.plan:
            record = squeeze_and_record(
                model, optimizer, self.plan[step], step, self.options,
                adapter_name=self.adapter_name, mode=self.mode, probe=self.probe,
            )  # fmt: skip
            if record is not None:
                self.events.append(record)
                self.rewarmup.start(step)
        self.rewarmup.scale(step, optimizer)
        self.lost_progress_watch.step_end(step, squeezed=record is not None)
        return record

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Just before ``optimizer.step()``: remember the squeezed modules' factors (the step scaling)."""
        self.step_scaling.before_step(model)

    def after_optimizer_step(self, optimizer: Any | None) -> None:
        """Just after ``optimizer.step()``: scale the squeezed modules' step, put back a re-warmed-up LR."""
        self.step_scaling.after_step()
        self.rewarmup.restore(optimizer)

    def finish(self, model: nn.Module, optimizer: Any | None, distributed: bool) -> LostProgress | None:
        """At the end of training: stop watching, compact masked modules into smaller ones (one process
        only), and return the lost-progress finding (None when the run kept what the source learned)."""
        self.probe.detach()
        self.lost_progress_watch.detach()
        compact_after_training(
            model, self.mode, adapter_name=self.adapter_name, optimizer=optimizer, distributed=distributed
        )
        return self.lost_progress_watch.finding()
