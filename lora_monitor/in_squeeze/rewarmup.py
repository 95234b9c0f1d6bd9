"""The learning rate ramped back up over a few steps after a squeeze (``rewarmup_steps``)."""

from __future__ import annotations

from typing import Any

from .optimizer import unwrap_optimizer


class LearningRateRewarmup:
    """After a squeeze, scale the learning rate by 1/(n+1), 2/(n+1), ... over the next ``steps`` steps.

    :meth:`scale` is called after a step ends and scales the next optimizer step's LR; :meth:`restore`,
    called after that optimizer step, puts the scheduler's value back, so that schedulers which build on
    the current LR never see the scaled one.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._from: int | None = None
        self._unscaled: list[float] | None = None

    def start(self, step: int) -> None:
        """A squeeze happened at ``step``."""
        if self.steps:
            self._from = step

    def scale(self, step: int, optimizer: Any | None) -> None:
        """Scale the learning rate of the optimizer step after ``step``, if it is still ramping up."""
        if self._from is None or optimizer is None:
            return
        done = step - self._from
        if done >= self.steps:
            self._from = None
            return
        factor = (done + 1) / (self.steps + 1)
        groups = unwrap_optimizer(optimizer).param_groups
        self._unscaled = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * factor

    def restore(self, optimizer: Any | None) -> None:
        """Put back the learning rates :meth:`scale` changed."""
        if self._unscaled is not None and optimizer is not None:
            for group, lr in zip(unwrap_optimizer(optimizer).param_groups, self._unscaled, strict=True):
                group["lr"] = lr
            self._unscaled = None

    def state(self) -> dict[str, Any]:
        """The ramp as a checkpoint keeps it (JSON): the squeeze step it started from, the LRs it scaled."""
        return {"from": self._from, "unscaled": self._unscaled}

    def load_state(self, saved: dict[str, Any], step: int, optimizer: Any | None) -> None:
        """Resume the ramp :meth:`state` saved at the end of ``step``: the next step's LR is scaled again from
        the scheduler's value, whatever LR the optimizer's own saved state brought back."""
        self._from, self._unscaled = saved.get("from"), saved.get("unscaled")
        if self._unscaled is not None:
            self.restore(optimizer)
            self.scale(step, optimizer)
