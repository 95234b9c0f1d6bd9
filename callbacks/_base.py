"""The one binding of a lora-monitor callback to a ``transformers.Trainer``: :class:`TrainerBoundCallback`.

It owns what every callback needs from the Trainer: the Trainer and its ``CallbackHandler`` (bound by
``attach(trainer)``, or found on the call stack), a log event of its own that reaches every ``report_to``
integration and ``state.log_history``, the last step of the run, and W&B where it is in use.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl
from transformers.trainer_callback import CallbackHandler

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the annotation is never evaluated at run time
    from typing_extensions import Self

logger = logging.getLogger("lora_monitor")


class TrainerBoundCallback(TrainerCallback):
    """A ``TrainerCallback`` bound to the Trainer that runs it.

    ``callback.attach(trainer)`` adds the callback to ``trainer`` (once: a callback already passed in
    ``callbacks=[...]`` is not added again) and binds it; a callback passed in ``callbacks=[...]`` binds
    itself at ``on_init_end`` and again at every ``on_train_begin`` (so one reused by a second Trainer
    reports to that one). Subclasses that override ``on_init_end`` or ``on_train_begin`` call ``super()``
    first.
    """

    _trainer: Any = None
    _handler: CallbackHandler | None = None
    _warned_no_handler: bool = False

    def attach(self, trainer: Any) -> Self:
        """Add this callback to ``trainer`` (unless it is there already) and bind it; returns ``self``."""
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._trainer, self._handler = trainer, trainer.callback_handler
        return self

    def on_init_end(self, args, state, control, **kwargs):
        self._bind_to_caller()

    def on_train_begin(self, args, state, control, **kwargs):
        self._bind_to_caller()

    def _bind_to_caller(self) -> None:
        """Bind to the Trainer (and handler) calling this callback now; keep the binding when none is found."""
        trainer = _calling_owner(lambda owner: _holds(getattr(owner, "callback_handler", None), self))
        if trainer is not None:
            self._trainer, self._handler = trainer, trainer.callback_handler
        else:  # a handler driven without a Trainer around it
            self._handler = _calling_owner(lambda owner: _holds(owner, self)) or self._handler

    def emit_log(self, args: Any, state: Any, control: TrainerControl, scalars: Mapping[str, float]):
        """Log ``scalars`` as an event of their own, made the way ``Trainer.log`` makes one, so that every
        ``report_to`` integration and ``state.log_history`` get them; returns the control to hand back.

        ``Trainer.log`` itself is not called: TRL's trainers override it to flush (and clear) their own
        accumulated metrics. ``CallbackHandler.on_log`` clears ``control.should_log`` because it assumes the
        Trainer's own log was just written; this event is an extra one, so the flag is put back, and the
        Trainer's pending loss log at this step survives.
        """
        logs = dict(scalars)
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        state.log_history.append({**logs, "step": state.global_step})
        if self._handler is None:
            if not self._warned_no_handler:
                logger.warning(
                    "%s: not called by a Trainer's CallbackHandler, so its metrics go to state.log_history "
                    "only; call callback.attach(trainer) to report them as well.",
                    type(self).__name__,
                )
                self._warned_no_handler = True
            return control
        should_log = control.should_log
        control = self._handler.on_log(args, state, control, logs)
        control.should_log = should_log or control.should_log
        return control

    @staticmethod
    def _is_last_step(state: Any, control: TrainerControl | None = None, step: int | None = None) -> bool:
        """True at the run's last optimizer step (``step``, default ``state.global_step``): ``max_steps``
        reached, or training told to stop.

        Work meant for "the end of training" that reports to the integrations is done at this step's
        ``on_step_end`` rather than in ``on_train_end``: the integrations' own ``on_train_end`` runs first
        (they are listed before user callbacks) and closes TensorBoard's writer and MLflow's run, so a later
        log event would be lost or start a second MLflow run.
        """
        step = state.global_step if step is None else step
        stopped = control is not None and bool(control.should_training_stop)
        return stopped or 0 < state.max_steps <= step

    def _held_out_loader(self, eval_dataloader: Any = None) -> Any:
        """The held-out dataloader: the one the Trainer handed the callback (``eval_dataloader``, set once it
        has evaluated), else one the bound Trainer builds from its ``eval_dataset``; None without either."""
        if eval_dataloader is not None:
            return eval_dataloader
        if getattr(self._trainer, "eval_dataset", None) is None:
            return None
        return self._trainer.get_eval_dataloader()

    @staticmethod
    def _active_wandb(args: Any):
        """The ``wandb`` module when the Trainer reports to W&B and a run is active, else None."""
        report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return None
        try:
            import wandb
        except ImportError:
            return None
        return wandb if wandb.run is not None else None

    @staticmethod
    def _log_table_to_wandb(
        wandb: Any,
        key: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        summary: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Log a table under ``key`` (with ``extra`` keys in the same call) to the active run of ``wandb``
        (from :meth:`_active_wandb`), and update its summary with ``summary``."""
        wandb.run.log({key: wandb.Table(columns=list(columns), data=list(rows)), **(extra or {})})
        wandb.run.summary.update(dict(summary))


def _holds(handler: Any, callback: TrainerCallback) -> bool:
    return isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks)


def _calling_owner(wanted: Callable[[Any], bool]) -> Any:
    """The first ``self`` among the calling frames for which ``wanted(self)`` holds, else None.

    Why a stack walk: ``CallbackHandler.call_event`` (transformers 5.23) passes callbacks the model,
    processing class, optimizer, scheduler and dataloaders, but no handle on the handler or the Trainer.
    ``attach(trainer)`` binds explicitly; this lookup is the fallback that keeps ``Trainer(callbacks=[...])``
    working: the Trainer whose ``callback_handler`` holds this very callback object.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if wanted(owner):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


__all__ = ["TrainerBoundCallback"]
