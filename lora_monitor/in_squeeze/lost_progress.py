"""Did the squeezed adapter lose what the source had learned? A check on the training loss, no data needed.

In-Squeeze scales each squeezed module's optimizer step (``lr_scaling="rank"``), so that a rank-8 adapter
learns as fast as the rank-64 one it came from. Where the source's learning rate already sits high in its
stable range, that speed is too much for the small adapter and the run can fall back to where it started:
``bench/EVIDENCE.md`` measured it at ``lora_alpha=16`` and 2e-3 on MiniLM, where the run ended at the
majority class while every other measured In-Squeeze run kept improving. A squeeze to a rank too small for
the task shows the same way. Neither raises an error: the loss is finite, only higher.

The check compares the training loss over the steps after the last squeeze with the loss just before the
first one (the last :data:`REFERENCE_STEPS` steps): once training is over, the squeezed adapter should do at
least as well as the source did before any squeeze. On the six runs of ``bench/in_squeeze_diagnosis.py``
the collapsed run is the only one above its reference (0.691 against 0.637: +2.3 standard errors); the
other five end 0.03-0.13 below theirs (−2.5 to −6.6 standard errors). Per-step losses are noisy, so the
check fires only when the difference is above :data:`SIGNIFICANCE` standard errors of the two means: a run
that has stopped improving before its first squeeze says nothing by chance more than ~1 time in 40.

The loss is the one the model returns on its training batches (read by a forward hook, no extra pass); a
trainer that computes it outside the model (GRPO) gives none, and the check says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

# Steps before the first squeeze that make the reference (fewer when the first squeeze comes earlier).
REFERENCE_STEPS = 10
# The fewest steps on each side for a verdict.
MIN_STEPS = 5
# How many standard errors of the difference the loss after the squeezes must be above the reference.
SIGNIFICANCE = 2.0


@dataclass(frozen=True)
class LostProgress:
    """The finding: the mean training loss after the last squeeze against the reference before the first."""

    reference_loss: float
    reference_steps: int
    first_squeeze_step: int
    loss_after: float
    steps_after: int
    last_squeeze_step: int
    standard_error: float

    @property
    def increase(self) -> float:
        return self.loss_after - self.reference_loss

    def message(self, where: str, lr_scaling: str) -> str:
        """One warning naming ``where`` (the callback), what was measured and what to try."""
        if math.isfinite(self.loss_after):
            significance = (
                f"; {self.increase / self.standard_error:.1f} standard errors" if self.standard_error else ""
            )
            measured = (
                f"the training loss after the last squeeze (step {self.last_squeeze_step}: mean "
                f"{self.loss_after:.4f} over {self.steps_after} steps) is {self.increase:.4f} above its level "
                f"just before the first squeeze (step {self.first_squeeze_step}: {self.reference_loss:.4f} over "
                f"{self.reference_steps} steps{significance})"
            )
        else:
            measured = f"the training loss became NaN/Inf after the squeeze at step {self.last_squeeze_step}"
        advice = (
            f"lr_scaling={lr_scaling!r} scales each squeezed module's step up after a squeeze, which overshoots "
            "where the learning rate is already high for the source rank: try lr_scaling='sqrt' or a lower "
            "learning rate"
            if lr_scaling != "none"
            else "Try a lower learning rate"
        )
        return (
            f"{where}: {measured}: the squeezed adapter lost what the source had learned, or the target rank is "
            f"too small for the task. {advice}, or a larger target_rank, and compare on held-out data."
        )


class LostProgressWatch:
    """Keeps the training loss of each step, as much as :meth:`finding` needs, and tells when it rose.

    ``step_end(step, squeezed)`` is called once per optimizer step, after any squeeze at that step;
    :meth:`state`/:meth:`load_state` carry it through a checkpoint (a dozen numbers, whatever the length of
    the run), so a resumed run reaches the verdict of the uninterrupted one.
    """

    def __init__(self) -> None:
        self._hook: Any = None
        self._batch_losses: list[float] = []
        self.first_squeeze_step: int | None = None
        self.last_squeeze_step: int | None = None
        self.reference: list[float] = []  # the last REFERENCE_STEPS losses before the first squeeze
        self._after = [0, 0.0, 0.0]  # count, sum, sum of squares of the losses since the last squeeze

    def attach(self, model: nn.Module) -> None:
        """Start reading the loss of ``model``'s training forward passes (once)."""
        if self._hook is None:
            self._hook = model.register_forward_hook(self._record)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training:
            return  # evaluation, or LossProbe's own measurement (it runs in eval mode)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is not None and loss.numel() == 1:
            self.record_loss(float(loss.detach()))

    def record_loss(self, loss: float) -> None:
        """One training forward pass's loss (the hook calls it; a trainer without one may call it too)."""
        self._batch_losses.append(loss)

    def step_end(self, step: int, squeezed: bool) -> None:
        """Close optimizer step ``step`` (the mean over its forward passes: gradient accumulation); a squeeze
        at this step (``squeezed``) starts a new "after" span, and the first one freezes the reference."""
        losses, self._batch_losses = self._batch_losses, []
        if losses:
            # a NaN/Inf loss counts as +inf: a run that blew up after a squeeze lost everything
            loss = sum(losses) / len(losses) if all(math.isfinite(x) for x in losses) else math.inf
            if self.first_squeeze_step is None:
                self.reference = [*self.reference, loss][-REFERENCE_STEPS:]
            else:
                count, total, squares = self._after
                self._after = [count + 1, total + loss, squares + loss * loss]
        if squeezed:
            if self.first_squeeze_step is None:
                self.first_squeeze_step = step
            self.last_squeeze_step = step
            self._after = [0, 0.0, 0.0]

    def finding(self) -> LostProgress | None:
        """The :class:`LostProgress` when the loss after the last squeeze is significantly above the
        reference; None when it is not, or when either side has fewer than :data:`MIN_STEPS` steps."""
        comparison = self.comparison()
        if comparison is None or comparison.increase <= SIGNIFICANCE * comparison.standard_error:
            return None
        return comparison

    def comparison(self) -> LostProgress | None:
        """The comparison :meth:`finding` judges, whether or not it is significant (a run that kept its
        progress has a negative :attr:`LostProgress.increase`); None when either side has fewer than
        :data:`MIN_STEPS` steps, or the reference is not finite."""
        count, total, squares = self._after
        if self.first_squeeze_step is None or count < MIN_STEPS or len(self.reference) < MIN_STEPS:
            return None
        reference = sum(self.reference) / len(self.reference)
        if not math.isfinite(reference):
            return None  # the source had blown up already: nothing to compare with
        reference_var = sum((x - reference) ** 2 for x in self.reference) / (len(self.reference) - 1)
        after = total / count
        after_var = max(squares - count * after * after, 0.0) / (count - 1) if math.isfinite(after) else 0.0
        error = math.sqrt(reference_var / len(self.reference) + after_var / count)
        return LostProgress(
            reference_loss=reference,
            reference_steps=len(self.reference),
            first_squeeze_step=self.first_squeeze_step,
            loss_after=after,
            steps_after=count,
            last_squeeze_step=self.last_squeeze_step or self.first_squeeze_step,
            standard_error=error,
        )

    def state(self) -> dict[str, Any]:
        """JSON-ready state for a checkpoint."""
        return {
            "first_squeeze_step": self.first_squeeze_step,
            "last_squeeze_step": self.last_squeeze_step,
            "reference": list(self.reference),
            "after": list(self._after),
        }

    def load_state(self, saved: Mapping[str, Any]) -> None:
        """Take back what :meth:`state` wrote."""
        self.first_squeeze_step = saved.get("first_squeeze_step")
        self.last_squeeze_step = saved.get("last_squeeze_step")
        self.reference = [float(x) for x in saved.get("reference", [])]
        count, total, squares = saved.get("after", [0, 0.0, 0.0])
        self._after = [int(count), float(total), float(squares)]
        self._batch_losses = []
