"""torch.distributed, for the few collectives lora-monitor needs (Accelerate and the Trainer set it up).

Every process computes its share of the work (:func:`my_share`), the results are gathered everywhere
(:func:`gather_objects`), and decisions that must be identical in every process come from the main process
(:func:`broadcast_from_main`). In a single process each is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process under torch.distributed, ``(0, 1)`` otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside a torch.distributed run of more than one process."""
    return rank_and_world()[1] > 1


def is_main_process() -> bool:
    """True in the process that writes files and logs (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def my_share(items: Sequence[Item]) -> list[Item]:
    """This process's round-robin share of ``items`` (all of them in a single process)."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def gather_objects(local: list[Item]) -> list[Item]:
    """Every process's ``local`` list, concatenated in rank order (``local`` itself in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return local
    shares: list[list[Item] | None] = [None] * world
    torch.distributed.all_gather_object(shares, local)
    return [item for share in shares for item in share or []]


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value`` in every process (a collective: every process must call it)."""
    if not is_distributed():
        return value
    message = [value if is_main_process() else None]
    torch.distributed.broadcast_object_list(message, src=0)
    return message[0]
