"""Post-Squeeze benchmark: a Llama-2-7B-shaped LoRA adapter on disk (r=64), analysed and compressed.

    python bench/squeeze.py                  # 32 layers, bf16 (~320 MB on disk; a few minutes on 2 cores)
    python bench/squeeze.py --layers 4       # a smaller adapter, for a smoke test
    BENCH_THREADS=1 python bench/squeeze.py  # one torch thread in every step (see below)

On a machine whose cores are busy with other work, two OpenMP threads make the many tiny batched r×r
eigh/SVD calls of the engine 20-50× slower (threads wait at barriers for a descheduled partner);
BENCH_THREADS=1 gives every step, the dense route included, one thread and numbers that hold up there.

The adapter has Llama-2-7B's shapes: per layer q, k, v, o (4096×4096), gate, up (11008×4096) and down
(4096×11008), 224 LoRA pairs at r=64 with random factors whose spectrum decays (so the recommended rank is a
real choice). It is written with safetensors into a temporary folder and deleted afterwards.

Each step runs in its own process, so that its peak resident memory (``ru_maxrss``) is its own, and the
steps alternate over ``--repeats`` rounds (3 by default): the table shows the min and the median of each
step's seconds and of its ratio to the load + save of the same round, the highest peak, and the part of it
above the process's memory after importing torch ("over imports"):

- safetensors load + save of the same file: the I/O reference every ratio is taken against;
- ``analyze_adapter`` (the factored route of the spectrum engine, float32);
- ``compress_adapter`` to rank 16, and to the recommended rank (which includes an analysis);
- PEFT's dense route (``add_weighted_adapter(..., combination_type="svd")`` forms ``ΔW = s·B@A`` and runs
  ``torch.linalg.svd`` on it) timed on one module of each shape and extrapolated to the whole adapter.

The floor printed under the table is what no implementation can beat on this machine: reading every
factor once, and the Gram products (r multiply-adds per factor element) at the measured matmul speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # module: (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across
    ``exec``, so a step's child would report the parent's peak (the parent writes the adapter)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # not Linux: KiB on Linux, bytes on macOS


# ---- the adapter -----------------------------------------------------------------------------------------


def write_adapter(folder: Path, layers: int, rank: int, dtype_name: str) -> int:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[dtype_name])
    generator = torch.Generator().manual_seed(0)
    decay = 0.93 ** torch.arange(rank, dtype=torch.float32)  # σ_i ∝ 0.93^i: recommended rank ~ 20
    tensors = {}
    for layer in range(layers):
        for module, (out_features, in_features) in SHAPES.items():
            stem = f"base_model.model.model.layers.{layer}.{module}"
            A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            B = torch.randn(out_features, rank, generator=generator) / rank**0.5 * 0.01
            tensors[f"{stem}.lora_A.weight"] = (A * decay.unsqueeze(1)).to(dtype)
            tensors[f"{stem}.lora_B.weight"] = B.to(dtype)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in SHAPES}),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() for t in tensors.values())


# ---- one step, in a child process ------------------------------------------------------------------------


def run_step(step: str, folder: Path, out: Path, rank: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    from safetensors.torch import load_file, save_file

    from lora_monitor.post_squeeze import analyze_adapter, compress_adapter

    # load LAPACK and friends before the clock starts: a one-off cost of any process, not of a step
    torch.linalg.svd(torch.randn(8, 8))
    torch.linalg.eigh(torch.eye(8, dtype=torch.float64))
    baseline = peak_rss_mb()
    result: dict = {}
    start = time.perf_counter()
    if step == "load_save":
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file(tensors, str(out / "copy.safetensors"), metadata={"format": "pt"})
    elif step == "analyze":
        analysis = analyze_adapter(folder, progress=False)
        result["recommended_rank"] = analysis.recommended_rank
        result["recommended_rank_weighted"] = analysis.recommended_rank_weighted
        result["mean_at_16"] = analysis.mean_variance[16]
    elif step == "compress_16":
        compress_adapter(folder, out / "r16", target_rank=16, progress=False)
    elif step == "compress_recommended":
        compressed = compress_adapter(folder, out / "recommended", progress=False)
        result["rank"] = sorted(set(compressed.ranks.values()))
    elif step == "dense_svd":
        # PEFT's route per module: ΔW = s·B@A formed in float32, then a dense SVD. One 4096×4096 and one
        # 11008×4096 module; down_proj (4096×11008) is the transposed shape, with the same SVD cost.
        from safetensors import safe_open

        per_shape = {}
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            for module in ("self_attn.q_proj", "mlp.gate_proj"):
                stem = f"base_model.model.model.layers.0.{module}"
                A = handle.get_tensor(f"{stem}.lora_A.weight").float()
                B = handle.get_tensor(f"{stem}.lora_B.weight").float()
                began = time.perf_counter()
                delta = 2.0 * (B @ A)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                new_B, new_A = U[:, :16] * S[:16], Vh[:16]
                per_shape[module] = time.perf_counter() - began
                del delta, U, S, Vh, new_B, new_A
        result["per_shape"] = per_shape
    elif step == "gemm":
        # matmul speed for the floor: a factor-sized product B^T B (11008×64) in float32
        B = torch.randn(11008, rank)
        for _ in range(3):
            B.mT @ B
        repeats = 200
        began = time.perf_counter()
        for _ in range(repeats):
            B.mT @ B
        result["flops"] = 2 * 11008 * rank * rank * repeats / (time.perf_counter() - began)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    result["baseline_rss_mb"] = baseline
    return result


def in_child(step: str, folder: Path, out: Path, rank: int) -> dict:
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--step",
            step,
            "--folder",
            str(folder),
            "--out",
            str(out),
            "--rank",
            str(rank),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---- the table -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the steps, alternating")
    parser.add_argument(
        "--dense",
        choices=("on", "off"),
        default="on",
        help="time PEFT's dense route on two modules (minutes on a busy machine)",
    )
    parser.add_argument(
        "--workspace",
        default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        help="folder for the adapter and the outputs (default: /dev/shm, a tmpfs, where there is one: on the "
        "disk, writing the same 305 MiB took 0.1-0.6 s from one run to the next here)",
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.folder), Path(args.out), args.rank)))
        return

    from rich.console import Console
    from rich.table import Table

    workspace = Path(tempfile.mkdtemp(prefix="lora-squeeze-bench-", dir=args.workspace))
    try:
        folder, out = workspace / "adapter", workspace / "out"
        out.mkdir()
        began = time.perf_counter()
        params = write_adapter(folder, args.layers, args.rank, args.dtype)
        size_mb = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        print(
            f"adapter: {args.layers} layers × 7 modules = {7 * args.layers} LoRA pairs, r={args.rank}, "
            f"{args.dtype}, {params / 1e6:.0f}M parameters, {size_mb:.0f} MiB (written in "
            f"{time.perf_counter() - began:.1f} s) in {workspace.parent}"
        )
        steps = ["load_save", "analyze", "compress_16", "compress_recommended", "gemm"]
        rounds: dict[str, list[dict]] = {step: [] for step in steps}
        for index in range(args.repeats):
            for step in steps:
                output = out / f"round-{index}"
                output.mkdir(exist_ok=True)
                rounds[step].append(in_child(step, folder, output, args.rank))
                print(f"  round {index + 1}, {step}: {rounds[step][-1]['seconds']:.2f} s", flush=True)
            shutil.rmtree(out / f"round-{index}")
        if args.dense == "on":  # minutes: once
            rounds["dense_svd"] = [in_child("dense_svd", folder, out, args.rank)]
        # Each step's highest peak memory and first result (the same in every round), its seconds per round.
        results = {
            step: {
                **found[0],
                "peak_rss_mb": max(item["peak_rss_mb"] for item in found),
                "baseline_rss_mb": min(item["baseline_rss_mb"] for item in found),
            }
            for step, found in rounds.items()
        }
        seconds = {step: [item["seconds"] for item in found] for step, found in rounds.items()}
        reference = min(seconds["load_save"])

        table = Table(
            title=f"Post-Squeeze, Llama-2-7B-shaped adapter ({7 * args.layers} pairs, r={args.rank})"
        )
        columns = (
            "step",
            "seconds (min · median)",
            "× load+save (min · median)",
            "peak RSS MiB",
            "over imports MiB",
        )
        for column in columns:
            table.add_column(column, justify="right" if column != "step" else "left")

        def spread(values: list[float]) -> str:
            return f"{min(values):.2f} · {statistics.median(values):.2f}"

        def row(label: str, step: str) -> None:
            result = results[step]
            rss = f"{result['peak_rss_mb']:.0f}"
            extra = f"{result['peak_rss_mb'] - result['baseline_rss_mb']:.0f}"
            # each round over the load + save of the same round (seconds apart: what the machine does hits both)
            ratios = [mine / own for mine, own in zip(seconds[step], seconds["load_save"], strict=True)]
            table.add_row(label, spread(seconds[step]), spread(ratios), rss, extra)

        row("safetensors load + save", "load_save")
        row("analyze_adapter", "analyze")
        row("compress_adapter, rank 16", "compress_16")
        row("compress_adapter, recommended rank", "compress_recommended")
        analysis = results["analyze"]
        console = Console(width=130)
        if "dense_svd" in results:
            per_shape = results["dense_svd"]["per_shape"]
            per_layer = 4 * per_shape["self_attn.q_proj"] + 3 * per_shape["mlp.gate_proj"]
            dense_total = per_layer * args.layers
            dense = results["dense_svd"]
            table.add_row(
                "PEFT dense route (ΔW + torch.linalg.svd) *",
                f"{dense_total:.2f}",
                f"{dense_total / reference:.2f}",
                f"{dense['peak_rss_mb']:.0f}",
                f"{dense['peak_rss_mb'] - dense['baseline_rss_mb']:.0f}",
            )
        console.print(table)
        console.print(
            f"adapter on disk: {size_mb:.0f} MiB; peak RSS over imports / adapter:", highlight=False
        )
        for step in ("analyze", "compress_16", "compress_recommended"):
            over = results[step]["peak_rss_mb"] - results[step]["baseline_rss_mb"]
            console.print(f"  {step}: {over / size_mb:.2f}×", highlight=False)
        if "dense_svd" in results:
            console.print(
                f"* extrapolated: 4 × q ({per_shape['self_attn.q_proj']:.2f} s) + 3 × gate "
                f"({per_shape['mlp.gate_proj']:.2f} s; up and down have the same or the transposed shape) "
                f"per layer × {args.layers} layers; its peak RSS is for those two modules only.",
                highlight=False,
            )
            console.print(
                f"dense route / analyze_adapter: {dense_total / min(seconds['analyze']):.0f}×;  "
                f"dense route / compress to 16: {dense_total / min(seconds['compress_16']):.0f}×",
                highlight=False,
            )
        flops = max(item["flops"] for item in rounds["gemm"])
        factor_elements = params
        gram_seconds = factor_elements * args.rank * 2 / flops
        console.print(
            f"floor: read the file {reference / 2:.2f} s (half of load+save, an estimate); Gram products "
            f"({args.rank} multiply-adds per factor element at the measured {flops / 1e9:.0f} GFLOP/s) "
            f"{gram_seconds:.2f} s",
            highlight=False,
        )
        console.print(
            f"recommended rank at 95%: {analysis['recommended_rank']} (energy-weighted "
            f"{analysis['recommended_rank_weighted']}); mean retention at rank 16: "
            f"{100 * analysis['mean_at_16']:.2f}%; torch threads: {os.environ.get('BENCH_THREADS', 'default')}",
            highlight=False,
        )
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
