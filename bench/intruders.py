"""Benchmark: the cost of intruder dimensions per module and per adapter, ours vs the dense route.

    python bench/intruders.py [--hidden 1024] [--intermediate 2816] [--layers 24] [--rank 16] [--repeats 3]

For one attention-shaped (hidden×hidden) and one MLP-shaped (hidden×intermediate) module with random
rank-``r`` LoRA factors and a random base weight (defaults: a 0.5B-class model, where the dense route still
runs in seconds; ``--hidden 4096 --intermediate 11008 --layers 32`` is Llama-2-7B, where one exact SVD takes
about two minutes on one CPU thread), it times, alternating, min and median of ``--repeats``:
  - ours, per check: the top-k of the implicit ``W + s·B@A`` by randomized SVD, compared with cached base
    vectors (what a training run pays at every check);
  - ours, once per module: the base's top 256 left singular vectors (randomized SVD, the default) or
    all of them (exact SVD);
  - dense, per check: form ``W + s·B@A`` and take its full SVD (the obvious route).
and extrapolates to the whole adapter (layers × 4 attention + 3 MLP modules).
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

MODULES_PER_LAYER = {"attention": 4, "mlp": 3}


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
    warm = BaseSubspaceCache()
    warm.vectors(label, W)
    routes = {
        "ours per check": lambda: intruder_dimensions([module], lambda _: W, top_k=args.top_k, cache=warm),
        "base vectors, top 256 (once)": lambda: BaseSubspaceCache().vectors(label, W),
        "dense per check": lambda: torch.linalg.svd(W + 2.0 * (B @ A), full_matrices=False),
        "base vectors, all (once)": lambda: BaseSubspaceCache(reference_rank=None).vectors(label, W),
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
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"intruder dimensions, r={args.rank}, top-{args.top_k}, {args.threads} thread(s)")
    modules = args.layers * sum(MODULES_PER_LAYER.values())
    for column in ("module", "route", "min s", "median s", f"whole adapter ({modules} modules)"):
        table.add_column(column, justify="right" if column != "route" else "left")
    totals: dict[str, float] = {}
    shapes = {"attention": (args.hidden, args.hidden), "mlp": (args.hidden, args.intermediate)}
    for label, (m, n) in shapes.items():
        samples = measure(label, m, n, args, console)
        count = MODULES_PER_LAYER[label] * args.layers
        for route, times in samples.items():
            totals[route] = totals.get(route, 0.0) + min(times) * count
            table.add_row(
                f"{label} {m}×{n}",
                route,
                f"{min(times):.3f}",
                f"{statistics.median(times):.3f}",
                f"{min(times) * count:.1f} s",
            )
    console.print(table)
    ratio = totals["dense per check"] / totals["ours per check"]
    console.print(
        f"whole adapter, per check: ours {totals['ours per check']:.1f} s vs dense "
        f"{totals['dense per check']:.1f} s ({ratio:.1f}× faster); base vectors once: top 256 "
        f"{totals['base vectors, top 256 (once)']:.1f} s, all {totals['base vectors, all (once)']:.1f} s"
    )


if __name__ == "__main__":
    main()
