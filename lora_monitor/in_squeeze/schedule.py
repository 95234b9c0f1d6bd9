"""When to squeeze and to which rank, and what goes with a squeeze during training.

- :func:`plan_schedule`: ``{step: rank cap}`` for a geometric, linear or explicit schedule, and
  :func:`check_something_to_squeeze`, which refuses a plan that can never lower a rank;
- :func:`squeeze_and_record`: one scheduled squeeze, timed and probed (by a
  :class:`~lora_monitor.in_squeeze.loss_probe.LossProbe`), as the record a run keeps, and
  :func:`log_scalars`, the ``in_squeeze/*`` scalars logged for it.

The learning-rate re-warm-up after a squeeze is :mod:`.rewarmup`'s.

None of it needs the Trainer: any training loop can call these between optimizer steps.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import LoraMonitorError, named
from .options import InSqueezeOptions, check_schedule, check_step, schedule_as_json
from .resize import current_ranks, squeeze_model

if TYPE_CHECKING:
    from .loss_probe import LossProbe

LOG_PREFIX = "in_squeeze/"


def resolve_step(value: int | float, max_steps: int, what: str, where: str = "") -> int:
    """A step given as an int (a step number) or a float in (0, 1) (a fraction of ``max_steps``); errors
    name ``what`` after ``where`` (what was given it), when given."""
    check_step(value, what, where)
    if isinstance(value, float) and 0 < value < 1:
        if max_steps <= 0:
            raise LoraMonitorError(named(f"{what}={value} is a fraction but max_steps is unknown", where))
        return max(1, round(value * max_steps))
    return int(value)


def plan_schedule(
    source_rank: int,
    target_rank: int,
    schedule: str | Sequence[tuple[int | float, int]],
    start_step: int,
    end_step: int,
    max_steps: int = 0,
    where: str = "",
) -> dict[int, int]:
    """``{global step: rank cap}`` of a squeeze schedule (steps after which the cap applies); errors name the
    option after ``where`` (what was given it), when given.

    ``geometric`` halves the rank at evenly spaced steps from ``start_step`` to ``end_step`` (16 → 8 → 4);
    ``linear`` lowers it one rank at a time, evenly over the same span; an explicit list of
    ``(step, rank)`` is taken as given (steps as numbers or fractions of ``max_steps``).
    """
    schedule = check_schedule(schedule, where)
    if not isinstance(schedule, str):
        plan = {resolve_step(step, max_steps, "schedule step", where): rank for step, rank in schedule}
        return dict(sorted(plan.items()))
    if end_step < start_step:
        raise LoraMonitorError(named(f"end_step {end_step} comes before start_step {start_step}", where))
    if target_rank >= source_rank:
        return {}
    if schedule == "geometric":
        caps = []
        rank = source_rank
        while rank // 2 > target_rank:
            rank //= 2
            caps.append(rank)
        caps.append(target_rank)
        if len(caps) == 1:
            return {end_step: target_rank}
        span = end_step - start_step
        return {round(start_step + span * i / (len(caps) - 1)): cap for i, cap in enumerate(caps)}
    plan = {}
    span = end_step - start_step + 1
    last = source_rank
    for step in range(start_step, end_step + 1):
        rank = round(source_rank + (target_rank - source_rank) * (step - start_step + 1) / span)
        if rank < last:
            plan[step] = rank
            last = rank
    return plan


def plan_for(options: InSqueezeOptions, source_rank: int, max_steps: int) -> dict[int, int]:
    """The plan of a run of ``max_steps`` steps whose adapter starts at ``source_rank`` (errors name the
    options' ``where``)."""
    start = resolve_step(options.start_step, max_steps, "start_step", options.where)
    end = resolve_step(options.end_step, max_steps, "end_step", options.where)
    return plan_schedule(
        source_rank, options.target_rank, options.schedule, start, end, max_steps, where=options.where
    )


def check_something_to_squeeze(
    plan: Mapping[int, int], source_rank: int | None, options: InSqueezeOptions, adapter_name: str | None
) -> None:
    """A :class:`LoraMonitorError` (naming the options' ``where``) when ``plan`` never goes below
    ``source_rank``, the largest rank of the modules of ``adapter_name``: a target at or above every module's
    rank can never squeeze anything, which is better said before the first step than found after the run."""
    if not source_rank or any(rank < source_rank for rank in plan.values()):
        return
    if isinstance(options.schedule, str):
        asked = f"target_rank={options.target_rank} is"
    else:
        asked = f"every rank of schedule={schedule_as_json(options.schedule)} is"
    raise LoraMonitorError(
        f"{options.where}: {asked} at or above the rank of every LoRA module of adapter "
        f"'{adapter_name}' (largest: {source_rank}), so nothing would ever be squeezed; "
        f"give a rank below {source_rank}"
    )


def squeeze_and_record(
    model: nn.Module,
    optimizer: Any | None,
    cap: int,
    step: int,
    options: InSqueezeOptions,
    *,
    adapter_name: str | None,
    mode: str,
    probe: LossProbe,
) -> dict[str, Any] | None:
    """Squeeze ``model`` to rank ``cap`` at ``step``; the record of what happened, or None if nothing did.

    The record: ``step``, ``rank_cap``, the per-module ``ranks`` after it, ``modules_squeezed``, the
    per-module ``retained_variance``, ``loss_before``/``loss_after`` on the latest training batch (NaN
    when unknown), ``squeeze_seconds`` (the squeeze alone) and ``seconds`` (with the loss probes).
    """
    began = time.perf_counter()
    loss_before = probe.loss(model)
    squeezed_at = time.perf_counter()
    events = squeeze_model(
        model,
        cap,
        adapter_name=adapter_name,
        optimizer=optimizer,
        mode=mode,
        seed=step,
        **options.squeeze_arguments(),
    )
    squeeze_seconds = time.perf_counter() - squeezed_at
    loss_after = probe.loss(model)
    if not events:
        return None
    return {
        "step": step,
        "rank_cap": cap,
        "ranks": current_ranks(model, adapter_name),
        "modules_squeezed": len(events),
        "retained_variance": {e.name: e.retained_variance for e in events},
        "loss_before": loss_before,
        "loss_after": loss_after,
        "squeeze_seconds": squeeze_seconds,
        "seconds": time.perf_counter() - began,
    }


def log_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The ``in_squeeze/*`` scalars of one squeeze record; those that are unknown (NaN) are left out."""
    ranks = record["ranks"].values()
    retained = [value for value in record["retained_variance"].values() if not math.isnan(value)]
    scalars = {
        f"{LOG_PREFIX}rank_mean": sum(ranks) / len(ranks),
        f"{LOG_PREFIX}rank_min": float(min(ranks)),
        f"{LOG_PREFIX}rank_max": float(max(ranks)),
        f"{LOG_PREFIX}modules_squeezed": float(record["modules_squeezed"]),
        f"{LOG_PREFIX}retained_variance_mean": sum(retained) / len(retained) if retained else math.nan,
        f"{LOG_PREFIX}retained_variance_min": min(retained) if retained else math.nan,
        f"{LOG_PREFIX}loss_before": record["loss_before"],
        f"{LOG_PREFIX}loss_after": record["loss_after"],
        f"{LOG_PREFIX}loss_jump": record["loss_after"] - record["loss_before"],
        f"{LOG_PREFIX}seconds": record["squeeze_seconds"],
    }
    # No loss to probe (a trainer that computes it outside the model, as GRPO does): leave it out.
    return {key: value for key, value in scalars.items() if not math.isnan(value)}


# Names that lived here until 0.x, moved to modules named for them: still readable from here for a release.
_MOVED = {"LossProbe": "loss_probe", "LearningRateRewarmup": "rewarmup"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module = f"lora_monitor.in_squeeze.{_MOVED[name]}"
        warnings.warn(
            f"lora_monitor.in_squeeze.schedule.{name} moved to {module}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
