"""Benchmark: the batched spectrum engine against the obvious alternatives, on a Llama-2-7B-shaped adapter.

    python bench/spectrum.py [--ranks 16,64] [--layers 32] [--repeats 3] [--threads N] [--dense scaled|full|off]
                             [--device cuda]

Random fp32 LoRA factors for 32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008).
For each rank it times, on the same tensors in one run (every row is printed as soon as it is measured):
  - reading every factor once (a sum over each): the memory floor;
  - the compute floor: the Gram products (2·r flops per factor element) at this machine's measured sgemm speed;
  - a per-module loop of thin QR of B and Aᵀ plus the SVD of the r×r core (the obvious exact route);
  - lora_monitor's engine: singular values of every ΔW, A and B (lora_spectra), and full U, S, V (factored_svd);
  - dense SVD of each m×n delta, extrapolated to all 224 modules (see --dense);
and prints the times, each next to the floor (the larger of the two floors), and engine / floor per rank.
With --device cuda (or any torch device) it also times lora_spectra and one monitor check on the factors
copied to that device, synchronised, in the same table as the CPU rows ('vs engine': against the CPU engine).

--dense scaled (default, ~10 s): dense singular values of quarter-size deltas (1024×1024, 2752×1024,
1024×2752) scaled by the m·n·min(m, n) flop ratio (64×): an estimate. --dense full measures one delta of
each real shape instead: three dense SVDs of up to 11008×4096, several minutes on a 2-core CPU.
--dense off skips it. Timings are min and median of --repeats (the loops and dense SVDs: one run);
--threads 1 steadies them on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lora_monitor.monitor import Monitor
from lora_monitor.spectrum import factored_svd, lora_spectra

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
NAMES += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def in_memory_adapter(modules: list[tuple[torch.Tensor, torch.Tensor]], rank: int):
    """The factors as a SavedAdapter held in memory: what ``Monitor.check`` reads, with no file behind it."""
    from lora_monitor.adapters import LoraModule, SavedAdapter
    from lora_monitor.adapters.saved import TensorReader

    records = []
    for index, (B, A) in enumerate(modules):
        layer, name = divmod(index, len(NAMES))
        records.append(
            LoraModule(
                name=f"model.layers.{layer}.{NAMES[name]}",
                module_type=NAMES[name].split(".")[1],
                layer_index=layer,
                kind="linear",
                rank=rank,
                alpha=float(rank),
                scale=1.0,
                use_rslora=False,
                use_dora=False,
                adapter_name="default",
                A_shape=tuple(A.shape),
                B_shape=tuple(B.shape),
                load_A=lambda A=A: A,
                load_B=lambda B=B: B,
            )
        )
    # Nothing is read from disk: each record loads its factor from memory, so the reader stays unopened.
    return SavedAdapter(
        Path("in-memory"), {}, Path("in-memory"), [], records, TensorReader(Path("in-memory"))
    )


DENSE_SHRINK = 4  # --dense scaled: each side divided by this, time multiplied by DENSE_SHRINK**3


def timings(fn, repeats: int, device: torch.device | None = None) -> tuple[float, float]:
    """(min, median) seconds of ``repeats`` calls after one warm-up call (allocator, thread pool); on an
    accelerator ``device`` each call is timed to the end of its queued work."""
    synchronize = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def sgemm_flops_per_second() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = timings(lambda: a @ b, 3)[0]
    return 2 * 2048**3 / seconds


def dense_seconds(shape: tuple[int, int], mode: str) -> float:
    """Seconds for the dense singular values of one rank-16 m×n delta (measured, or scaled from a quarter size)."""
    m, n = shape
    shrink = DENSE_SHRINK if mode == "scaled" else 1
    B, A = torch.randn(m // shrink, 16), torch.randn(16, n // shrink)
    seconds = timings(lambda: torch.linalg.svdvals(B @ A), 1)[0]
    return seconds * shrink**3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument(
        "--dense",
        choices=("scaled", "full", "off"),
        default="scaled",
        help="dense SVD extrapolation: scaled from quarter-size deltas (~10 s, default), full shapes (minutes), off",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="also time the engine and a monitor check on this torch device (e.g. cuda)",
    )
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else None
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 120))
    torch.manual_seed(0)
    with console.status("measuring sgemm speed"):
        flops = sgemm_flops_per_second()
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, sgemm {flops / 1e9:.0f} GFLOP/s, "
        f"{args.layers} layers × {len(SHAPES)} modules"
    )

    dense_per_shape = {}
    if args.dense != "off":
        for shape in sorted(set(SHAPES)):
            with console.status(f"dense SVD of a {shape[0]}×{shape[1]} delta ({args.dense})"):
                dense_per_shape[shape] = dense_seconds(shape, args.dense)
            console.log(f"dense SVD {shape[0]}×{shape[1]} ({args.dense}): {dense_per_shape[shape]:.2f} s")

    where = "CPU" if device is None else f"CPU and {device}"
    table = Table(title=f"Singular values of every LoRA delta in a 7B-shaped adapter (fp32, {where})")
    for column in ("rank", "what", "min (ms)", "median (ms)", "vs floor", "vs engine"):
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

        compute_floor = 2 * rank * elements / flops
        measurements = {
            "read every factor once (memory floor)": lambda: timings(read_once, args.repeats),
            "compute floor (Gram flops at sgemm speed)": lambda floor=compute_floor: (floor, floor),
            "engine: lora_spectra (values of ΔW, A, B)": lambda Bs=Bs, As=As: timings(
                lambda: lora_spectra(Bs, As), args.repeats
            ),
            "per-module QR + core SVD loop (values)": lambda: timings(qr_loop, 1),
            "engine: factored_svd (U, S, V)": lambda Bs=Bs, As=As: timings(lambda: factored_svd(Bs, As), 1),
            "per-module QR + core SVD loop (U, S, V)": lambda: timings(qr_loop_vectors, 1),
            "one monitor check (Monitor.check: metrics, alerts, summary)": lambda modules=modules, rank=rank: (
                timings(
                    partial(Monitor(track_gradients=False).check, in_memory_adapter(modules, rank), 1),
                    args.repeats,
                )
            ),
        }
        if device is not None:
            moved = [(B.to(device), A.to(device)) for B, A in modules]
            measurements[f"on {device}: lora_spectra (values of ΔW, A, B)"] = lambda moved=moved: timings(
                lambda: lora_spectra([B for B, _ in moved], [A for _, A in moved]), args.repeats, device
            )
            measurements[f"on {device}: one monitor check"] = lambda moved=moved, rank=rank: timings(
                partial(Monitor(track_gradients=False).check, in_memory_adapter(moved, rank), 1),
                args.repeats,
                device,
            )
        rows: dict[str, tuple[float, float]] = {}
        for what, measure in measurements.items():
            with console.status(f"r={rank}: {what}"):
                rows[what] = measure()
            console.log(
                f"r={rank}: {what}: min {rows[what][0] * 1e3:,.1f} ms, median {rows[what][1] * 1e3:,.1f} ms"
            )
        if dense_per_shape:
            dense = args.layers * sum(dense_per_shape[shape] for shape in SHAPES)
            label = "estimated from quarter size" if args.dense == "scaled" else "extrapolated"
            rows[f"dense SVD of each m×n ΔW ({label})"] = (dense, dense)
        floor = max(rows["read every factor once (memory floor)"][0], compute_floor)
        engine = rows["engine: lora_spectra (values of ΔW, A, B)"][0]
        vectors = rows["engine: factored_svd (U, S, V)"][0]
        for what, (fastest, median) in rows.items():
            reference = vectors if "U, S, V" in what else engine  # the check: vs its lora_spectra call
            table.add_row(
                str(rank),
                what,
                f"{fastest * 1e3:,.1f}",
                f"{median * 1e3:,.1f}",
                f"{fastest / floor:,.2f}×",
                f"{fastest / reference:,.2f}×",
            )
        table.add_row(
            str(rank),
            f"[bold]floor {floor * 1e3:,.1f} ms; lora_spectra / floor[/bold]",
            "",
            "",
            f"[bold]{engine / floor:.2f}×[/bold]",
            "",
        )
        table.add_section()
    console.print(table)
    console.print(
        "floor: the larger of the memory floor (min) and the compute floor. 'vs floor' and 'vs engine' use the"
        " min times; 'vs engine' divides by the engine's time for the same output (values rows by lora_spectra,"
        " U,S,V rows by factored_svd): >1 means the engine is faster."
    )


if __name__ == "__main__":
    main()
