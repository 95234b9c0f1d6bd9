"""What In-Squeeze keeps in a checkpoint so that a resumed run is the uninterrupted run.

The factors and their ranks travel in the checkpoint's adapter file (the state-dict hooks of :mod:`.hooks`
save them at the squeezed rank and make room for them on load), the optimizer's moments in its own file.
The rest lives only in the callback and changes training, so it is written beside them as JSON (a
``transformers`` callback writes it into ``trainer_state.json``):

- the source ranks, which the step scaling divides by (after a resume the live ranks are the squeezed ones);
- the plan of squeezes (the schedule's progress is the plan and the global step);
- the learning-rate re-warm-up ramp (a checkpoint taken inside it must resume inside it);
- the per-module ranks at the save, checked against the model once the checkpoint is loaded;
- the training losses the lost-progress check compares (:mod:`.lost_progress`), a dozen numbers.

None of it needs the Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LoraMonitorError
from .resize import current_ranks

if TYPE_CHECKING:
    from torch import nn

    from .lost_progress import LostProgressWatch
    from .rewarmup import LearningRateRewarmup
    from .step_scaling import SqueezedStepScaling

# The key of this state in a callback's entry of ``trainer_state.json`` ("args"/"attributes" are the Trainer's).
RESUME_KEY = "lora_monitor_in_squeeze"
_VERSION = 1


@dataclass
class InSqueezeResumeState:
    """The In-Squeeze state a checkpoint keeps (see the module docstring); JSON both ways."""

    source_ranks: dict[str, int]
    plan: dict[int, int]
    rewarmup: dict[str, Any]
    ranks: dict[str, int] | None
    # the lost-progress check's numbers (:class:`~.lost_progress.LostProgressWatch`); absent in older files
    lost_progress: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plan steps as ``[step, rank]`` pairs: JSON object keys are strings)."""
        return {
            "version": _VERSION,
            "source_ranks": dict(self.source_ranks),
            "plan": [[step, rank] for step, rank in sorted(self.plan.items())],
            "rewarmup": dict(self.rewarmup),
            "ranks": None if self.ranks is None else dict(self.ranks),
            "lost_progress": None if self.lost_progress is None else dict(self.lost_progress),
        }

    @classmethod
    def from_json(cls, saved: Mapping[str, Any], where: str) -> InSqueezeResumeState:
        """The state :meth:`to_json` wrote; a :class:`LoraMonitorError` naming ``where`` if it is not that."""
        try:
            if saved.get("version") != _VERSION:
                raise ValueError(f"version {saved.get('version')!r}, expected {_VERSION}")
            ranks = saved.get("ranks")
            return cls(
                source_ranks={str(name): int(rank) for name, rank in saved["source_ranks"].items()},
                plan={int(step): int(rank) for step, rank in saved["plan"]},
                rewarmup=dict(saved["rewarmup"]),
                ranks=None if ranks is None else {str(name): int(rank) for name, rank in ranks.items()},
                lost_progress=None if saved.get("lost_progress") is None else dict(saved["lost_progress"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise LoraMonitorError(
                f"{where}: the saved In-Squeeze state is not readable ({error})"
            ) from error

    def restore_into(
        self,
        model: nn.Module,
        optimizer: Any | None,
        step: int,
        *,
        adapter_name: str | None,
        step_scaling: SqueezedStepScaling,
        rewarmup: LearningRateRewarmup,
        where: str,
        lost_progress: LostProgressWatch | None = None,
    ) -> int | None:
        """Resume from this state at ``step``, once the checkpoint is loaded into ``model``: check that the
        model holds the saved per-module ranks (:func:`check_resumed_ranks`, naming ``where``), give
        ``step_scaling`` back its source ranks, ``rewarmup`` its ramp and ``lost_progress`` its losses. Returns the largest source rank
        the checkpoint kept (None in one that kept none: the model's own ranks stand)."""
        check_resumed_ranks(self.ranks, current_ranks(model, adapter_name), where)
        source_rank = None
        if self.source_ranks:
            step_scaling.source_ranks = self.source_ranks
            source_rank = max(self.source_ranks.values())
        rewarmup.load_state(self.rewarmup, step, optimizer)
        if lost_progress is not None and self.lost_progress is not None:
            lost_progress.load_state(self.lost_progress)
        return source_rank


def check_resumed_ranks(saved: Mapping[str, int] | None, live: Mapping[str, int], where: str) -> None:
    """Raise a :class:`LoraMonitorError` when the model, once the checkpoint is loaded, does not hold the
    per-module ranks the checkpoint was saved at (a resume that would silently train something else)."""
    if saved is None or dict(saved) == dict(live):
        return
    differing = sorted(name for name in set(saved) | set(live) if saved.get(name) != live.get(name))
    first = differing[0]
    raise LoraMonitorError(
        f"{where}: the checkpoint was saved with {first} at rank {saved.get(first)}, but the resumed model has "
        f"it at rank {live.get(first)} ({len(differing)} module(s) differ): build the model at the source "
        "rank as for the first run and pass InSqueezeCallback in Trainer(callbacks=[...]) with the same "
        "arguments, so that its hooks load the squeezed checkpoint"
    )


def saved_entry(stateful_callbacks: Mapping[str, Any] | None, class_name: str, index: int, peers: int) -> Any:
    """The checkpoint's entry for callback ``index`` of the ``peers`` callbacks named ``class_name``
    (``TrainerState.stateful_callbacks``), or None. With several of one class, transformers appends each
    save's entries to one list after those written when the Trainer was built: the latest ``peers`` are
    this save's, in order."""
    entry = (stateful_callbacks or {}).get(class_name)
    if isinstance(entry, list):
        latest = entry[len(entry) - peers :] if len(entry) >= peers else []
        entry = latest[index] if index < len(latest) else None
    return entry


def read_resume_state(
    stateful_callbacks: Mapping[str, Any] | None,
    class_name: str,
    index: int,
    peers: int,
    arguments: Mapping[str, Any],
    where: str,
) -> tuple[InSqueezeResumeState | None, bool]:
    """The In-Squeeze state a checkpoint keeps for callback ``index`` of the ``peers`` named ``class_name``
    (:func:`saved_entry`), or None in one written without it; and whether it was saved with these
    ``arguments`` (the callback's, as JSON), so that the plan made at the start still holds. A state that is
    not readable is a :class:`LoraMonitorError` naming ``where``."""
    entry = saved_entry(stateful_callbacks, class_name, index, peers)
    if not isinstance(entry, dict) or RESUME_KEY not in entry:
        return None, False
    saved = InSqueezeResumeState.from_json(entry[RESUME_KEY], where)
    return saved, entry.get("args") == arguments
