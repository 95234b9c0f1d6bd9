"""The worker side: join a gloo process group through a file, and leave it cleanly."""

from __future__ import annotations

import os
import sys
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
    the Trainer exists: Accelerate's ``PartialState`` then uses it instead of starting its own.

    Leaving, when the work finished: a gloo barrier (every process is done), then two meetings through a
    separate file store, outside gloo: no process destroys the group while a peer may still be inside the
    barrier's last exchange, and none exits while a peer is still destroying it. A process that closes its
    gloo connections under a peer still using them can abort that peer ("terminate called without an
    active exception", seen once in a loaded CI run, after every result had been written). The group is
    destroyed in any case: one left alive at exit can abort the interpreter the same way. A worker that
    finished then exits at once, without the interpreter's teardown (see the end of this function).
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group(
        "gloo",
        init_method=Path(init_file).resolve().as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    # The exit meetings' own store: a separate file, so it outlives the group's.
    exit_store = torch.distributed.FileStore(f"{init_file}.exit", world_size)
    finished = False
    try:
        yield rank
        finished = True
    finally:
        try:
            if finished:  # after a failure the peer may never arrive; the launcher stops it instead
                torch.distributed.barrier()
                _meet(exit_store, "barrier-left", rank, world_size)
        finally:
            torch.distributed.destroy_process_group()
        if finished:
            _meet(exit_store, "group-destroyed", rank, world_size)
        print(f"[worker {rank}] left the process group", flush=True)
    if finished:
        # The work is done and its results written and closed. What is left is the interpreter's teardown,
        # where torch's C++ objects are destroyed in an order no one controls; it aborted a worker once more
        # ("terminate called without an active exception", no Python frame) after every meeting above had
        # passed. A finished worker skips it: nothing of the test's runs there.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _meet(store: torch.distributed.Store, stage: str, rank: int, world_size: int) -> None:
    """Wait until every process has reached ``stage`` (through ``store``, not through the gloo group)."""
    store.set(f"{stage}/{rank}", "1")
    store.wait([f"{stage}/{peer}" for peer in range(world_size)], COLLECTIVE_TIMEOUT)
