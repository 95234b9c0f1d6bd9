"""What every lora-monitor callback needs from the Trainer: its callback handler, a log event, the process."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler


def find_calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The ``CallbackHandler`` that is calling ``callback`` right now (None when not called by a Trainer).

    Why a stack walk: a callback that reports its own log event needs the Trainer's handler, and
    ``CallbackHandler.call_event`` (transformers 5.23) passes callbacks the model, processing class,
    optimizer, scheduler and dataloaders, but no handle on the handler or the Trainer. So the handler is
    looked up among the calling frames: the ``CallbackHandler`` whose ``callbacks`` hold this very object.
    ``callback.attach(trainer)`` binds explicitly and is what the docs recommend; this lookup keeps
    ``Trainer(callbacks=[...])`` working. Called from ``on_init_end``/``on_train_begin``: searching at every
    train begin keeps a callback reused by a second Trainer bound to the new one.
    """
    return _calling_owner(lambda owner: _holds(owner, callback))


def find_calling_trainer(callback: TrainerCallback) -> Any:
    """The Trainer whose handler is calling ``callback`` right now (None when not called by a Trainer): the
    same stack walk as :func:`find_calling_handler`, for a callback that needs the Trainer's own data (its
    ``eval_dataset``, through ``get_eval_dataloader``)."""
    return _calling_owner(lambda owner: _holds(getattr(owner, "callback_handler", None), callback))


def _holds(handler: Any, callback: TrainerCallback) -> bool:
    return isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks)


def _calling_owner(wanted) -> Any:
    """The first ``self`` among the calling frames for which ``wanted(self)`` holds, else None."""
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


def emit_log(handler: CallbackHandler | None, args: Any, state: Any, control: Any, scalars: dict[str, float]):
    """A log event of its own, made the way ``Trainer.log`` makes one, so every ``report_to`` integration sees it.

    ``Trainer.log`` itself is not called: TRL's trainers override it to flush (and clear) their own
    accumulated metrics. ``CallbackHandler.on_log`` clears ``control.should_log`` because it assumes the
    Trainer's own log was just written; this event is an extra one, so the flag is put back, and the
    Trainer's pending loss log at this step survives. Returns the control to hand back to the Trainer.
    """
    logs = dict(scalars)
    if state.epoch is not None:
        logs["epoch"] = state.epoch
    state.log_history.append({**logs, "step": state.global_step})
    if handler is None:
        return None
    should_log = control.should_log
    control = handler.on_log(args, state, control, logs)
    control.should_log = should_log or control.should_log
    return control


def is_last_step(state: Any, control: Any) -> bool:
    """True at the ``on_step_end`` of the run's last optimizer step (``max_steps`` reached, or stopped).

    Work meant for "the end of training" that reports to the integrations is done here rather than in
    ``on_train_end``: the integrations' own ``on_train_end`` runs first (they are listed before user
    callbacks) and closes TensorBoard's writer and MLflow's run, so a later log event would be lost or
    start a second MLflow run.
    """
    return bool(control.should_training_stop) or (
        state.max_steps > 0 and state.global_step >= state.max_steps
    )


def active_wandb(args: Any):
    """The ``wandb`` module when the Trainer reports to W&B and a run is active, else None."""
    report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
    if "wandb" not in report_to and "all" not in report_to:
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb if wandb.run is not None else None
