"""The worker side: join a gloo process group through a file, and leave it cleanly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

# A peer that died leaves the others waiting in a collective; fail well before the test's own timeout.
COLLECTIVE_TIMEOUT = timedelta(minutes=4)


@contextmanager
def process_group(init_file: str) -> Iterator[int]:
    """Join the run's process group (rank and size from ``RANK``/``WORLD_SIZE``); yields this rank.

    The group is initialised from ``init_file`` (a ``file://`` rendezvous: no port to race for), before
    the Trainer exists: Accelerate's ``PartialState`` then uses it instead of starting its own. On the way
    out every process meets at a barrier, so none tears down the group while a peer still talks to it, and
    the group is destroyed: a gloo group left alive at exit can abort the interpreter ("terminate called
    without an active exception").
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group(
        "gloo",
        init_method=Path(init_file).resolve().as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    finished = False
    try:
        yield rank
        finished = True
    finally:
        try:
            if finished:  # after a failure the peer may never arrive; the launcher stops it instead
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
