"""A worker whose rank 1 fails after a collective: ``<init file>``. The launcher must report it."""

from __future__ import annotations

import sys

import torch

from distributed_workers.group import process_group


def main(init_file: str) -> None:
    with process_group(init_file) as rank:
        total = torch.ones(1)
        torch.distributed.all_reduce(total)  # the group works: both processes joined it
        print(f"rank {rank} sees {int(total.item())} processes", flush=True)
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")


if __name__ == "__main__":
    main(*sys.argv[1:])
