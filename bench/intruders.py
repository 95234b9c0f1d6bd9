"""Benchmark: the cost of intruder dimensions per module, on Llama-2-7B shapes, ours vs the dense route.

    python bench/intruders.py [--rank 16] [--top-k 10] [--repeats 3] [--threads 1]

For one attention-shaped (4096×4096) and one MLP-shaped (4096×11008) module with random rank-``r`` LoRA
factors and a random base weight, it times, alternating, min and median of ``--repeats``:
  - ours, per check: the top-k of the implicit ``W + s·B@A`` by randomized SVD, compared with cached base
    vectors (what a training run pays at every check);
  - ours, once per module: the base's left singular vectors, all of them (exact SVD) or the top 128
    (randomized SVD);
  - dense, per check: form ``W + s·B@A`` and take its full SVD (the obvious route).
and extrapolates to the 224 modules of a 7B adapter (32 layers × 4 attention + 3 MLP).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from lora_monitor.adapters import LoraModule
from lora_monitor.monitor.intruders import BaseSubspaceCache, intruder_dimensions

SHAPES = {"attention 4096×4096": (4096, 4096), "mlp 4096×11008": (4096, 11008)}
MODULES_PER_LAYER = {"attention 4096×4096": 4, "mlp 4096×11008": 3}


def module_record(name: str, B: torch.Tensor, A: torch.Tensor, scale: float) -> LoraModule:
    rank = A.shape[0]
    return LoraModule(
        name=name,
        module_type=name,
        layer_index=0,
        kind="linear",
        rank=rank,
        alpha=scale * rank,
        scale=scale,
        use_rslora=False,
        use_dora=False,
        adapter_name="default",
        A_shape=tuple(A.shape),
        B_shape=tuple(B.shape),
        load_A=lambda: A,
        load_B=lambda: B,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(label: str, m: int, n: int, args: argparse.Namespace, console: Console) -> dict[str, list[float]]:
    """Seconds per route for one module shape, the routes alternating within each repeat."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=generator) / n**0.5
    B = torch.randn(m, args.rank, generator=generator) * 0.01
    A = torch.randn(args.rank, n, generator=generator) / n**0.5
    module = module_record(label, B, A, scale=2.0)
    warm = BaseSubspaceCache(reference_rank=128)
    warm.vectors(label, W)
    routes = {
        "ours per check": lambda: intruder_dimensions([module], lambda _: W, top_k=args.top_k, cache=warm),
        "base vectors, top 128 (once)": lambda: BaseSubspaceCache(128).vectors(label, W),
        "dense per check": lambda: torch.linalg.svd(W + 2.0 * (B @ A), full_matrices=False),
        "base vectors, all (once)": lambda: BaseSubspaceCache().vectors(label, W),
    }
    samples: dict[str, list[float]] = {route: [] for route in routes}
    for _ in range(args.repeats):  # alternating, so that machine noise hits every route alike
        for route, fn in routes.items():
            samples[route].append(timed(fn))
            console.print(f"  {label} {route}: {samples[route][-1]:.3f} s", style="dim")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"intruder dimensions, r={args.rank}, top-{args.top_k}, {args.threads} thread(s)")
    for column in ("module", "route", "min s", "median s", "7B adapter (224 modules)"):
        table.add_column(column, justify="right" if column != "route" else "left")
    totals = {"ours per check": 0.0, "base vectors, all (once)": 0.0, "base vectors, top 128 (once)": 0.0}
    totals["dense per check"] = 0.0
    for label, (m, n) in SHAPES.items():
        samples = measure(label, m, n, args, console)
        count = MODULES_PER_LAYER[label] * 32
        for route, times in samples.items():
            totals[route] += min(times) * count
            table.add_row(
                label,
                route,
                f"{min(times):.3f}",
                f"{statistics.median(times):.3f}",
                f"{min(times) * count:.0f} s",
            )
    console.print(table)
    ratio = totals["dense per check"] / totals["ours per check"]
    console.print(
        f"7B adapter, per check: ours {totals['ours per check']:.0f} s vs dense {totals['dense per check']:.0f} s "
        f"({ratio:.1f}× faster); base vectors once: all {totals['base vectors, all (once)']:.0f} s, "
        f"top 128 {totals['base vectors, top 128 (once)']:.0f} s"
    )


if __name__ == "__main__":
    main()
