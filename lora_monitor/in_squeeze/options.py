"""The options of In-Squeeze, checked in one place for the functions, the callback and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._distributed import is_distributed
from ..errors import LoraMonitorError, check_choice, check_number, named

METHODS = ("qr", "rsvd")
OPTIMIZER_STATES = ("project", "reset")
MODES = ("resize", "mask")
# After a squeeze, each squeezed module's step is scaled by r_source/r_now, its square root, or not at all.
STEP_SCALINGS = ("rank", "sqrt", "none")
# What the callback accepts: "auto" is mask in a distributed run, resize otherwise.
CALLBACK_MODES = ("auto", *MODES)
# The named schedules; a list of (step, rank) pairs is the other kind.
SCHEDULES = ("geometric", "linear")


def check_step(value: object, what: str, where: str = "") -> int | float:
    """``value`` if it names a step: a step number (a whole number >= 1) or a fraction of ``max_steps`` in
    (0, 1); else a :class:`LoraMonitorError` naming ``what`` (after ``where``, as :func:`check_choice` does).
    Which step a fraction is needs ``max_steps``
    (:func:`~lora_monitor.in_squeeze.schedule.resolve_step`); its form does not."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    fraction = is_number and isinstance(value, float) and 0 < value < 1
    if not (fraction or (is_number and value >= 1 and float(value).is_integer())):
        raise LoraMonitorError(
            named(f"{what} must be a step number (int ≥ 1) or a fraction in (0, 1), got {value!r}", where)
        )
    return value  # type: ignore[return-value]


def check_schedule(schedule: object, where: str = "") -> str | tuple[tuple[int | float, int], ...]:
    """The schedule as given (a name) or as a tuple of ``(step, rank)`` pairs, each step a step number or a
    fraction and each rank a whole number >= 1; else a :class:`LoraMonitorError` naming the first value
    that is not."""
    if isinstance(schedule, str):
        return check_choice(schedule, SCHEDULES, "schedule", where, hint="or a list of (step, rank) pairs")
    if isinstance(schedule, bytes) or not isinstance(schedule, Sequence) or not schedule:
        raise LoraMonitorError(
            named(
                f"schedule must be one of {SCHEDULES} or a non-empty list of (step, rank) pairs, "
                f"got {schedule!r}",
                where,
            )
        )
    pairs = []
    for entry in schedule:
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise LoraMonitorError(
                named(f"every schedule entry must be a (step, rank) pair, got {entry!r}", where)
            )
        step, rank = entry
        check_step(step, "every schedule step", where)
        rank = check_number(rank, "every schedule rank", low=1, whole=True, where=where)
        pairs.append((step, int(rank)))
    return tuple(pairs)


def schedule_as_json(schedule: str | Sequence[tuple[int | float, int]]) -> str | list[list[int | float]]:
    """``schedule`` as JSON holds it: a name as it is, ``(step, rank)`` pairs as ``[step, rank]`` lists (what
    a checkpoint keeps of the argument, and what a message about it shows)."""
    return schedule if isinstance(schedule, str) else [list(entry) for entry in schedule]


def run_is_distributed(world_size: int = 1, deepspeed: Any = None, fsdp: Any = None) -> bool:
    """True when a run trains in several processes, or under DeepSpeed or FSDP, so its parameter set is fixed:
    a torch.distributed group of more than one process, or the trainer's own view (``world_size``, and its
    ``deepspeed`` or ``fsdp`` settings, which are set up before the group may exist)."""
    return is_distributed() or world_size > 1 or bool(deepspeed) or bool(fsdp)


def _is_fraction(step: int | float) -> bool:
    return isinstance(step, float) and 0 < step < 1


def check_span(start_step: object, end_step: object, where: str = "") -> None:
    """A :class:`LoraMonitorError` unless ``start_step`` and ``end_step`` each name a step and the end does
    not come before the start (where both are step numbers, or both fractions: a fraction and a step number
    compare only once ``max_steps`` is known, at the start of training)."""
    check_step(start_step, "start_step", where)
    check_step(end_step, "end_step", where)
    # Which form a step is takes its value, not its type: 5.0 is step 5, 0.7 is 70% of max_steps.
    if _is_fraction(start_step) == _is_fraction(end_step) and end_step < start_step:  # type: ignore[operator]
        raise LoraMonitorError(named(f"end_step {end_step} comes before start_step {start_step}", where))


def check_squeeze_options(
    *,
    method: str = "qr",
    optimizer_state: str = "project",
    mode: str = "resize",
    min_variance_retention: float | None = None,
    modes: Sequence[str] = MODES,
    where: str = "",
) -> None:
    """Raise one :class:`LoraMonitorError` for the first squeeze option that is not valid (named after
    ``where``, when given)."""
    check_choice(method, METHODS, "method", where)
    check_choice(optimizer_state, OPTIMIZER_STATES, "optimizer_state", where)
    check_choice(mode, modes, "mode", where)
    if min_variance_retention is not None:
        check_number(
            min_variance_retention,
            "min_variance_retention",
            low=0,
            low_open=True,
            high=1,
            hint="0.9 = keep 90%",
            where=where,
        )


@dataclass(frozen=True)
class InSqueezeOptions:
    """Everything that says how to squeeze during training (see ``InSqueezeCallback`` for each field),
    checked when made.

    ``where`` is what an error message names first: what was given these options (``"InSqueezeCallback"``
    when the callback builds them), here and in :meth:`resolve_mode` and
    :func:`~lora_monitor.in_squeeze.schedule.plan_for`.
    """

    target_rank: int = 8
    schedule: str | Sequence[tuple[int | float, int]] = "geometric"
    start_step: int | float = 0.3
    end_step: int | float = 0.7
    method: str = "qr"
    optimizer_state: str = "project"
    mode: str = "auto"
    min_variance_retention: float | None = None
    rewarmup_steps: int = 0
    rsvd_oversample: int = 10
    rsvd_power_iters: int = 2
    lr_scaling: str = "rank"
    where: str = field(default="InSqueezeOptions", compare=False)

    def __post_init__(self) -> None:
        where = self.where
        rank = check_number(self.target_rank, "target_rank", low=1, whole=True, where=where)
        object.__setattr__(self, "target_rank", int(rank))
        check_schedule(self.schedule, where)
        check_span(self.start_step, self.end_step, where)
        check_squeeze_options(
            method=self.method,
            optimizer_state=self.optimizer_state,
            mode=self.mode,
            min_variance_retention=self.min_variance_retention,
            modes=CALLBACK_MODES,
            where=where,
        )
        steps = check_number(self.rewarmup_steps, "rewarmup_steps", low=0, whole=True, where=where)
        object.__setattr__(self, "rewarmup_steps", int(steps))
        check_number(self.rsvd_oversample, "rsvd_oversample", low=0, whole=True, where=where)
        check_number(self.rsvd_power_iters, "rsvd_power_iters", low=0, whole=True, where=where)
        check_choice(self.lr_scaling, STEP_SCALINGS, "lr_scaling", where)

    def resolve_mode(self, distributed: bool) -> str:
        """``resize`` or ``mask`` for this run: ``auto`` masks when distributed; resize cannot be distributed."""
        if self.mode == "auto":
            return "mask" if distributed else "resize"
        if self.mode == "resize" and distributed:
            raise LoraMonitorError(
                f"{self.where}: mode='resize' cannot change the parameter set of a distributed "
                "(DDP/FSDP/DeepSpeed) run; use mode='mask' or 'auto'"
            )
        return self.mode

    def squeeze_arguments(self) -> dict[str, object]:
        """The keyword arguments of :func:`~lora_monitor.in_squeeze.squeeze_model` these options give."""
        return {
            "method": self.method,
            "optimizer_state": self.optimizer_state,
            "min_variance_retention": self.min_variance_retention,
            "rsvd_oversample": self.rsvd_oversample,
            "rsvd_power_iters": self.rsvd_power_iters,
        }
