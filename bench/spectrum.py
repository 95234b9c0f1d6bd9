"""Benchmark: the batched spectrum engine against the obvious alternatives, on a Llama-2-7B-shaped adapter.

    python bench/spectrum.py [--ranks 16,64] [--layers 32] [--repeats 3]

Random fp32 LoRA factors for 32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008).
For each rank it times, on the same tensors in one run:
  - reading every factor once (a sum over each): the memory floor;
  - the compute floor: the Gram products (2·r flops per factor element) at this machine's measured sgemm speed;
  - a per-module loop of thin QR of B and Aᵀ plus the SVD of the r×r core (the obvious exact route);
  - lora_monitor's engine: singular values of every ΔW, A and B (lora_spectra), and full U, S, V (factored_svd);
  - dense SVD of the m×n delta, measured on one module of each shape and extrapolated to all 224.
and prints the times and the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from lora_monitor.spectrum import factored_svd, lora_spectra

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sgemm_flops_per_second() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = best_time(lambda: a @ b, 3)
    return 2 * 2048**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense SVD extrapolation")
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(0)
    flops = sgemm_flops_per_second()
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, sgemm {flops / 1e9:.0f} GFLOP/s, "
        f"{args.layers} layers × {len(SHAPES)} modules"
    )

    dense_seconds_per_shape = {}
    if not args.skip_dense:
        for m, n in sorted(set(SHAPES)):
            B, A = torch.randn(m, 16), torch.randn(16, n)
            dense_seconds_per_shape[(m, n)] = best_time(lambda B=B, A=A: torch.linalg.svdvals(B @ A), 1)

    table = Table(title="Singular values of every LoRA delta in a 7B-shaped adapter (fp32, CPU)")
    for column in ("rank", "what", "time (ms)", "vs engine"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for rank in [int(r) for r in args.ranks.split(",")]:
        modules = [
            (torch.randn(m, rank), torch.randn(rank, n)) for _ in range(args.layers) for m, n in SHAPES
        ]
        Bs, As = [B for B, _ in modules], [A for _, A in modules]
        elements = sum(B.numel() + A.numel() for B, A in modules)

        def read_once(modules=modules):
            return sum(float(B.sum()) + float(A.sum()) for B, A in modules)

        def qr_loop(modules=modules):
            for B, A in modules:
                R_B = torch.linalg.qr(B, mode="r")[1]
                R_A = torch.linalg.qr(A.T, mode="r")[1]
                torch.linalg.svdvals(R_B @ R_A.T)

        def qr_loop_vectors(modules=modules):
            for B, A in modules:
                Q_B, R_B = torch.linalg.qr(B)
                Q_A, R_A = torch.linalg.qr(A.T)
                U, _, Vh = torch.linalg.svd(R_B @ R_A.T)
                Q_B @ U, Q_A @ Vh.T

        rows = {
            "read every factor once (memory floor)": best_time(read_once, args.repeats),
            "compute floor (Gram flops at sgemm speed)": 2 * rank * elements / flops,
            "per-module QR + core SVD loop (values)": best_time(qr_loop, 1),
            "engine: lora_spectra (values of ΔW, A, B)": best_time(
                lambda Bs=Bs, As=As: lora_spectra(Bs, As), args.repeats
            ),
            "per-module QR + core SVD loop (U, S, V)": best_time(qr_loop_vectors, 1),
            "engine: factored_svd (U, S, V)": best_time(lambda Bs=Bs, As=As: factored_svd(Bs, As), 1),
        }
        if dense_seconds_per_shape:
            rows["dense SVD of each m×n ΔW (extrapolated)"] = args.layers * sum(
                dense_seconds_per_shape[shape] for shape in SHAPES
            )
        engine = rows["engine: lora_spectra (values of ΔW, A, B)"]
        floor = max(
            rows["read every factor once (memory floor)"], rows["compute floor (Gram flops at sgemm speed)"]
        )
        for what, seconds in rows.items():
            reference = rows["engine: factored_svd (U, S, V)"] if "U, S, V" in what else engine
            table.add_row(str(rank), what, f"{seconds * 1e3:,.1f}", f"{seconds / reference:,.2f}×")
        table.add_row(str(rank), "[bold]engine / floor[/bold]", "", f"{engine / floor:.2f}×")
        table.add_section()
    console.print(table)
    console.print(
        "'vs engine': time of the row divided by the engine's time for the same output "
        "(values rows vs lora_spectra, U,S,V rows vs factored_svd); >1 means the engine is faster."
    )


if __name__ == "__main__":
    main()
