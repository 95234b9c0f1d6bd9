"""The test side: start one process per rank, wait for all, and fail with their output if one fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
# Generous: two processes share two busy cores. A failed peer is noticed at once, not at this limit.
JOIN_TIMEOUT_SECONDS = 480
POLL_SECONDS = 0.5
FAILURE_GRACE_SECONDS = 20


def _tail(log: Path, characters: int = 6000) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no output)"
    return text[-characters:]


def run_workers(module: str, tmp_path: Path, *args: str, world_size: int = 2) -> None:
    """Run ``python -m distributed_workers.<module> <init file> *args`` once per rank and join them all.

    Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (what Accelerate and
    the Trainer read to know the run is distributed) and the path of a fresh rendezvous file in
    ``tmp_path``. ``MASTER_ADDR``/``MASTER_PORT`` point nowhere usable, so a TCP rendezvous attempted by
    anything would fail the test instead of racing for a port. When a worker fails the others get a
    short grace to exit and are then stopped, and the test fails with every worker's output. Workers run
    with ``-X faulthandler``: one that aborts leaves the Python stack of each of its threads in that output.
    """
    init_file = tmp_path / "process_group_init"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "tcp-rendezvous-not-used.invalid",
        "MASTER_PORT": "9",
    }
    logs = [tmp_path / f"worker{rank}.log" for rank in range(world_size)]
    processes = []
    for rank, log in enumerate(logs):
        with log.open("w") as handle:  # a file, not a pipe: a full pipe would block a chatty worker
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-X",
                        "faulthandler",
                        "-m",
                        f"distributed_workers.{module}",
                        str(init_file),
                        *args,
                    ],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
    timed_out = False
    try:
        while any(p.poll() is None for p in processes):
            if time.monotonic() >= deadline:
                timed_out = not any(p.returncode not in (None, 0) for p in processes)
                break
            if any(p.returncode not in (None, 0) for p in processes):
                # The others may only wait for the failed one in a collective: a short grace to exit.
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECONDS)
            with contextlib.suppress(subprocess.TimeoutExpired):
                next(p for p in processes if p.poll() is None).wait(timeout=POLL_SECONDS)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    codes = [process.returncode for process in processes]
    if any(code != 0 for code in codes):
        outputs = "\n".join(
            f"--- worker {rank} (exit {codes[rank]}) ---\n{_tail(log)}" for rank, log in enumerate(logs)
        )
        reason = f"timed out after {JOIN_TIMEOUT_SECONDS} s" if timed_out else "failed"
        pytest.fail(f"distributed workers {reason}: exit codes {codes}\n{outputs}", pytrace=False)
