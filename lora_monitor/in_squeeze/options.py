"""The options of In-Squeeze, checked in one place for the functions, the callback and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LoraMonitorError, check_number

METHODS = ("qr", "rsvd")
OPTIMIZER_STATES = ("project", "reset")
MODES = ("resize", "mask")
# After a squeeze, each squeezed module's step is scaled by r_source/r_now, its square root, or not at all.
STEP_SCALINGS = ("rank", "sqrt", "none")
# What the callback accepts: "auto" is mask in a distributed run, resize otherwise.
CALLBACK_MODES = ("auto", *MODES)


def check_choice(value: object, choices: Sequence[str], option: str, where: str = "") -> str:
    """``value`` if it is one of ``choices``, else a :class:`LoraMonitorError` naming the option."""
    if value not in choices:
        prefix = f"{where}: " if where else ""
        raise LoraMonitorError(f"{prefix}{option} must be one of {tuple(choices)}, got {value!r}")
    return str(value)


def check_squeeze_options(
    *,
    method: str = "qr",
    optimizer_state: str = "project",
    mode: str = "resize",
    min_variance_retention: float | None = None,
    modes: Sequence[str] = MODES,
    where: str = "",
) -> None:
    """Raise one :class:`LoraMonitorError` for the first squeeze option that is not valid."""
    check_choice(method, METHODS, "method", where)
    check_choice(optimizer_state, OPTIMIZER_STATES, "optimizer_state", where)
    check_choice(mode, modes, "mode", where)
    if min_variance_retention is not None:
        name = f"{where}: min_variance_retention" if where else "min_variance_retention"
        check_number(min_variance_retention, name, low=0, low_open=True, high=1, hint="0.9 = keep 90%")


@dataclass(frozen=True)
class InSqueezeOptions:
    """Everything that says how to squeeze during training (see ``InSqueezeCallback`` for each field)."""

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

    def __post_init__(self) -> None:
        where = "InSqueezeCallback"
        rank = check_number(self.target_rank, f"{where}: target_rank", low=1, whole=True)
        object.__setattr__(self, "target_rank", int(rank))
        check_squeeze_options(
            method=self.method,
            optimizer_state=self.optimizer_state,
            mode=self.mode,
            min_variance_retention=self.min_variance_retention,
            modes=CALLBACK_MODES,
            where=where,
        )
        steps = check_number(self.rewarmup_steps, f"{where}: rewarmup_steps", low=0, whole=True)
        object.__setattr__(self, "rewarmup_steps", int(steps))
        check_number(self.rsvd_oversample, f"{where}: rsvd_oversample", low=0, whole=True)
        check_number(self.rsvd_power_iters, f"{where}: rsvd_power_iters", low=0, whole=True)
        check_choice(self.lr_scaling, STEP_SCALINGS, "lr_scaling", where)

    def resolve_mode(self, distributed: bool) -> str:
        """``resize`` or ``mask`` for this run: ``auto`` masks when distributed; resize cannot be distributed."""
        if self.mode == "auto":
            return "mask" if distributed else "resize"
        if self.mode == "resize" and distributed:
            raise LoraMonitorError(
                "InSqueezeCallback: mode='resize' cannot change the parameter set of a distributed "
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
