"""Benchmark: lora-monitor against its peers on one Llama-2-7B-shaped r=16 adapter, whole processes.

    bash bench/peers_setup.sh          # once: each peer in its own venv under /tmp (see that file)
    python bench/peers.py [--runs 3] [--rank 16] [--target-rank 8] [--layers 32] [--import-profile]
    python bench/peers.py --runs 1 --state /tmp/peers.json   # three times: one round per call, same table

The job, for every tool: read a saved PEFT adapter (adapter_config.json + adapter_model.safetensors; 224
LoRA pairs, fp32, 32 layers × q,k,v,o 4096×4096 + gate,up 11008×4096 + down 4096×11008), compute the
singular values of every ΔW, and write a rank-8 compressed adapter folder.

  ours, command   lora-monitor squeeze ADAPTER --rank 8 --out OUT --overwrite
  ours, API       analyze_adapter(ADAPTER) + compress_adapter(ADAPTER, OUT, target_rank=8)
  retrain 0.3.0   retrain squeeze.toml   ([squeeze] adapter_path, compress_to = 8, output_path): its
                  analyze_adapter + compress_adapter (per-module QR of both factors + r×r SVD, done twice)
  retrain, API    retrain.squeeze.analyze_adapter + retrain.squeeze.compress_adapter
  gradience 0.11  gradience audit --peft-dir ADAPTER --json --no-udr, then
                  gradience truncate --peft-dir ADAPTER --out-dir OUT --rank 8 --dtype fp32 (two processes)
  gradience, API  gradience.vnext.audit.audit_lora_peft_dir + gradience.vnext.svd_truncate.svd_truncate_peft_dir

The adapter is written once to a temporary folder without instantiating a model (the safetensors keys PEFT
writes, ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ...). Every run is a fresh
process; tools alternate within each round, and min and median over ``--runs`` rounds are printed. "wall" is
the whole process as the parent sees it (interpreter start, imports, work, exit); API workers also print
their own import time (importing the tool's entry points) and compute time (the calls, including any
module the calls import lazily). Each output folder is checked to hold rank-8 factors.

Peers run from their own venvs (``--retrain-python``, ``--gradience-python``; defaults /tmp/peer-*/bin/python);
a peer whose venv is missing or whose run fails is reported with the reason instead of a time.
``--import-profile`` also runs ``python -X importtime`` on our command and prints where its import time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
HIDDEN, INTERMEDIATE = 4096, 11008
MARK = "BENCH "

OURS_API = """
import time, json, sys
start = time.perf_counter()
from lora_monitor import analyze_adapter, compress_adapter
imported = time.perf_counter()
analysis = analyze_adapter(sys.argv[1], progress=False)
compress_adapter(sys.argv[1], sys.argv[2], target_rank=int(sys.argv[3]), overwrite=True, progress=False)
done = time.perf_counter()
print("BENCH " + json.dumps({"imports": imported - start, "compute": done - imported}))
"""

RETRAIN_API = """
import time, json, sys
start = time.perf_counter()
from retrain.squeeze import analyze_adapter, compress_adapter
imported = time.perf_counter()
analysis = analyze_adapter(sys.argv[1])
compress_adapter(sys.argv[1], sys.argv[2], int(sys.argv[3]))
done = time.perf_counter()
print("BENCH " + json.dumps({"imports": imported - start, "compute": done - imported}))
"""

GRADIENCE_API = """
import time, json, sys
start = time.perf_counter()
from gradience.vnext.audit import audit_lora_peft_dir
from gradience.vnext.svd_truncate import svd_truncate_peft_dir
imported = time.perf_counter()
audit = audit_lora_peft_dir(sys.argv[1], compute_udr=False)
svd_truncate_peft_dir(sys.argv[1], sys.argv[2], int(sys.argv[3]), save_dtype="fp32")
done = time.perf_counter()
print("BENCH " + json.dumps({"imports": imported - start, "compute": done - imported}))
"""


def write_adapter(folder: Path, layers: int, rank: int) -> None:
    """A PEFT LoRA folder for a Llama-2-7B-shaped model, written key by key (no model is built)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {name: (HIDDEN, HIDDEN) for name in ATTENTION}
    shapes.update(
        gate_proj=(INTERMEDIATE, HIDDEN), up_proj=(INTERMEDIATE, HIDDEN), down_proj=(HIDDEN, INTERMEDIATE)
    )
    tensors = {}
    # A decaying spectrum, as trained adapters have: column j of B scaled by 0.8^j.
    decay = 0.8 ** torch.arange(rank, dtype=torch.float32)
    for layer in range(layers):
        for name, (out_features, in_features) in shapes.items():
            block = "self_attn" if name in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            B = torch.randn(out_features, rank, generator=generator) * 0.01 * decay
            tensors[f"{prefix}.lora_A.weight"] = A
            tensors[f"{prefix}.lora_B.weight"] = B
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(ATTENTION + MLP),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def output_rank(folder: Path) -> str:
    """The set of lora_A ranks in a written adapter (e.g. "8"), or why there is none."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return f"no {weights.name} in {folder}"
    with safe_open(str(weights), "pt") as handle:
        keys = [key for key in handle.keys() if "lora_A" in key]  # noqa: SIM118 (safe_open is no dict)
        ranks = {handle.get_slice(key).get_shape()[0] for key in keys}
    return ",".join(str(r) for r in sorted(ranks))


class Tool:
    """One way of doing the job: a list of commands run in sequence (each a fresh process)."""

    def __init__(self, name: str, commands: list[list[str]], env: dict[str, str], prints_split: bool):
        self.name, self.commands, self.env, self.prints_split = name, commands, env, prints_split
        self.walls: list[float] = []
        self.imports: list[float] = []
        self.computes: list[float] = []
        self.error: str | None = None

    def run(self, output: Path, target_rank: int) -> None:
        shutil.rmtree(output, ignore_errors=True)
        wall = 0.0
        split = {"imports": 0.0, "compute": 0.0}
        for command in self.commands:
            start = time.perf_counter()
            done = subprocess.run(command, env=self.env, capture_output=True, text=True)
            wall += time.perf_counter() - start
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                self.error = f"exit {done.returncode}: " + " | ".join(tail)
                return
            for line in done.stdout.splitlines():
                if line.startswith(MARK):
                    for key, value in json.loads(line[len(MARK) :]).items():
                        split[key] += value
        rank = output_rank(output)
        if rank != str(target_rank):
            self.error = f"output is not rank {target_rank}: {rank}"
            return
        self.walls.append(wall)
        if self.prints_split:
            self.imports.append(split["imports"])
            self.computes.append(split["compute"])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    env.update(extra or {})
    return env


def build_tools(args, adapter: Path, output: Path, work: Path) -> tuple[list[Tool], list[str]]:
    ours_env = clean_env(
        {"PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))}
    )
    target = str(args.target_rank)
    ours_command = Path(sys.executable).with_name("lora-monitor")
    tools = [
        Tool(
            "lora-monitor (command)",
            [
                [
                    str(ours_command),
                    "squeeze",
                    str(adapter),
                    "--rank",
                    target,
                    "--out",
                    str(output),
                    "--overwrite",
                ]
            ],
            ours_env,
            False,
        ),
        Tool(
            "lora-monitor (API)",
            [[sys.executable, "-c", OURS_API, str(adapter), str(output), target]],
            ours_env,
            True,
        ),
    ]
    missing = []
    retrain = Path(args.retrain_python)
    if retrain.is_file():
        toml = work / "squeeze.toml"
        toml.write_text(
            f'[squeeze]\nadapter_path = "{adapter}"\noutput_path = "{output}"\ncompress_to = {target}\n'
        )
        tools.append(
            Tool(
                "retrain 0.3.0 (command)",
                [[str(retrain.with_name("retrain")), str(toml)]],
                clean_env(),
                False,
            )
        )
        tools.append(
            Tool(
                "retrain 0.3.0 (API)",
                [[str(retrain), "-c", RETRAIN_API, str(adapter), str(output), target]],
                clean_env(),
                True,
            )
        )
    else:
        missing.append(f"retrain: no interpreter at {retrain} (run bench/peers_setup.sh)")
    gradience = Path(args.gradience_python)
    if gradience.is_file():
        cli = str(gradience.with_name("gradience"))
        tools.append(
            Tool(
                "gradience 0.11.0 (audit + truncate commands)",
                [
                    [cli, "audit", "--peft-dir", str(adapter), "--json", "--no-udr"],
                    [
                        cli,
                        "truncate",
                        "--peft-dir",
                        str(adapter),
                        "--out-dir",
                        str(output),
                        "--rank",
                        target,
                        "--dtype",
                        "fp32",
                    ],
                ],
                clean_env(),
                False,
            )
        )
        tools.append(
            Tool(
                "gradience 0.11.0 (API)",
                [[str(gradience), "-c", GRADIENCE_API, str(adapter), str(output), target]],
                clean_env(),
                True,
            )
        )
    else:
        missing.append(f"gradience: no interpreter at {gradience} (run bench/peers_setup.sh)")
    return tools, missing


def import_profile(console: Console, adapter: Path, output: Path, target: str, top: int = 12) -> None:
    """Where our command's import time goes: self time summed by top-level package (python -X importtime)."""
    env = clean_env({"PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))})
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "lora_monitor.cli",
        "squeeze",
        str(adapter),
        "--rank",
        target,
        "--out",
        str(output),
        "--overwrite",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    by_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(self_us) / 1e6
    total = sum(by_package.values())
    table = Table(
        title=f"Import time of `lora-monitor squeeze` by top-level package (self time, total {total:.2f} s)"
    )
    table.add_column("package")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for package, seconds in sorted(by_package.items(), key=lambda item: -item[1])[:top]:
        table.add_row(package, f"{seconds:.3f}", f"{seconds / total:.0%}")
    console.print(table)
    imported = {
        line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    console.print(f"transformers imported by our command: {'yes' if 'transformers' in imported else 'no'}")


def fmt(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--retrain-python", default="/tmp/peer-retrain/bin/python")
    parser.add_argument("--gradience-python", default="/tmp/peer-gradience/bin/python")
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: run only tools whose name matches"
    )
    parser.add_argument(
        "--state",
        default="",
        help="JSON file of earlier rounds' times, read before and written after (to split rounds over several calls)",
    )
    parser.add_argument(
        "--import-profile", action="store_true", help="also show where our command's import time goes"
    )
    args = parser.parse_args()
    console = Console(width=max(Console().width, 120))
    with tempfile.TemporaryDirectory(prefix="lora-monitor-peers-") as temporary:
        work = Path(temporary)
        adapter, output = work / "adapter", work / "out"
        with console.status("writing the adapter"):
            write_adapter(adapter, args.layers, args.rank)
        size = (adapter / "adapter_model.safetensors").stat().st_size
        console.print(
            f"adapter: {args.layers * 7} LoRA pairs, r={args.rank}, fp32, {size / 1e6:.0f} MB, in {adapter}"
        )
        tools, missing = build_tools(args, adapter, output, work)
        if args.only:
            tools = [t for t in tools if any(part in t.name for part in args.only.split(","))]
        for line in missing:
            console.print(f"[yellow]not measured[/yellow]: {line}")
        state = Path(args.state) if args.state else None
        earlier = json.loads(state.read_text()) if state and state.is_file() else {}
        for tool in tools:
            for key in ("walls", "imports", "computes"):
                getattr(tool, key).extend(earlier.get(tool.name, {}).get(key, []))
        for round_number in range(1, args.runs + 1):
            for tool in tools:
                if tool.error:
                    continue
                with console.status(f"round {round_number}/{args.runs}: {tool.name}"):
                    tool.run(output, args.target_rank)
                wall = f"{tool.walls[-1]:.2f} s" if tool.walls and not tool.error else tool.error
                console.print(f"round {round_number}: {tool.name}: {wall}")
        if state:
            state.write_text(
                json.dumps(
                    {t.name: {k: getattr(t, k) for k in ("walls", "imports", "computes")} for t in tools}
                )
            )
        reference = {True: None, False: None}
        for tool in tools:
            if tool.name.startswith("lora-monitor") and tool.walls:
                reference[tool.prints_split] = tool
        table = Table(
            title=f"Analyse + write a rank-{args.target_rank} adapter, {args.layers * 7} modules r={args.rank} (seconds, min / median of the runs)"
        )
        for column in ("tool", "wall", "imports (median)", "compute", "wall vs ours", "compute vs ours"):
            table.add_column(column, justify="left" if column == "tool" else "right")
        for tool in tools:
            if tool.error:
                table.add_row(tool.name, f"[red]failed[/red]: {tool.error}", "", "", "", "")
                continue
            ours = reference[tool.prints_split] or reference[False]
            ours_compute = reference[True]
            wall_ratio = (
                statistics.median(tool.walls) / statistics.median(ours.walls) if ours else float("nan")
            )
            compute_ratio = (
                statistics.median(tool.computes) / statistics.median(ours_compute.computes)
                if tool.computes and ours_compute
                else None
            )
            table.add_row(
                tool.name,
                fmt(tool.walls),
                f"{statistics.median(tool.imports):.2f}" if tool.imports else "-",
                fmt(tool.computes),
                f"{wall_ratio:.2f}×",
                f"{compute_ratio:.2f}×" if compute_ratio is not None else "-",
            )
        console.print(table)
        console.print(
            "wall vs ours: median wall over ours of the same kind (command vs our command, API vs our API); "
            "compute vs ours: median compute over our API's. >1 means lora-monitor is faster."
        )
        if args.import_profile:
            import_profile(console, adapter, output, str(args.target_rank))


if __name__ == "__main__":
    main()
