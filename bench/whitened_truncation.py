"""Can a truncation that sees the layer inputs keep more of a text adapter than the SVD does (issue 28)?

    python bench/whitened_truncation.py --seeds 0,1,2 --sources /tmp/sources --out whitened.jsonl
    python bench/whitened_truncation.py --table-only --out bench/whitened-truncation.jsonl

Post-Squeeze keeps the best rank-k ΔW in the Frobenius norm, which treats every input direction alike. On
the generation task at ``lora_alpha=16`` Post-Squeeze 64→8 ends 0.0057 ± 0.0004 nats behind its source
(bench/EVIDENCE.md). The function-aware alternative (the whitening of SVD-LLM, Wang et al. 2024) keeps the
best rank-k ΔW for the outputs on real inputs: minimise ‖(ΔW − M)Xᵀ‖_F with the input Gram G = XᵀX
factored G + λI = LLᵀ, so that M = SVD_k(ΔW·L)·L⁻¹. This script measures whether that wins the 0.006 back.

Each source is the generation task's tuned r=64 at ``lora_alpha=16`` (3e-3, the rate dev picked on every
seed; the training of ``bench/evidence.py``, bit-identical to its runs), saved once under ``--sources``. Each
is truncated to rank 8 by the SVD and by the whitening (G from 128 train windows or from the 64 dev windows;
λ = 0.01 or 0.1 × the mean of G's diagonal), and scored on the 256 test windows. One JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # the task, data and training loop of the evidence grid

ALPHA, LR, SOURCE_RANK, TARGET_RANK = 16, 3e-3, 64, 8
CALIBRATION_WINDOWS = 128
DAMPINGS = (0.01, 0.1)


def lora_pairs(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    from lora_monitor.adapters import factor_parameters, find_lora_modules

    return {
        record.name: factor_parameters(record.module, record.adapter_name)
        for record in find_lora_modules(model)
    }


@torch.no_grad()
def input_grams(model, batches) -> dict[str, torch.Tensor]:
    """XᵀX (float64) of every LoRA layer's input over ``batches`` (every window is full: no padding)."""
    from lora_monitor.adapters import find_lora_modules

    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return accumulate

    handles = [r.module.register_forward_pre_hook(hook(r.name)) for r in find_lora_modules(model)]
    model.eval()
    try:
        for _, batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


@torch.no_grad()
def truncate_in_place(model, grams: dict[str, torch.Tensor] | None, damping: float) -> dict[str, tuple]:
    """Every pair truncated to ``TARGET_RANK`` (zero-padded in place); returns the originals to restore."""
    from lora_monitor.spectrum.factored import truncate_factors

    originals = {}
    for name, (B, A) in lora_pairs(model).items():
        originals[name] = (B.detach().clone(), A.detach().clone())
        if grams is None:
            result = truncate_factors(B, A, TARGET_RANK, dtype=torch.float64)
            new_B, new_A = result.B, result.A
        else:
            gram = grams[name]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            lower = torch.linalg.cholesky(gram + damping * gram.diagonal().mean() * eye)
            result = truncate_factors(B.double(), A.double() @ lower, TARGET_RANK, dtype=torch.float64)
            new_B = result.B
            new_A = torch.linalg.solve_triangular(lower, result.A, upper=False, left=False)
        B.zero_()
        A.zero_()
        B[:, : new_B.shape[1]] = new_B.to(B.dtype)
        A[: new_A.shape[0]] = new_A.to(A.dtype)
    return originals


@torch.no_grad()
def restore(model, originals: dict[str, tuple]) -> None:
    for name, (B, A) in lora_pairs(model).items():
        B.copy_(originals[name][0])
        A.copy_(originals[name][1])


def source(seed: int, folder: Path, data: dict, tokenizer):
    """The tuned r=64 at ``lora_alpha=16`` of ``seed``: trained and saved once, then loaded."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").exists():
        model = evidence.lora_model(SOURCE_RANK, ALPHA, seed)
        evidence.train(model, data["train"], tokenizer, seed, LR)
        model.save_pretrained(folder)
    base, _ = evidence.base_model()
    return PeftModel.from_pretrained(base, folder)


def measure(seed: int, sources: Path) -> dict:
    _, tokenizer = evidence.base_model()
    data = evidence.splits(tokenizer)
    test = evidence.eval_batches(data["test"], tokenizer, 16)
    calibration = {
        "train": evidence.eval_batches(data["train"].select(range(CALIBRATION_WINDOWS)), tokenizer, 16),
        "dev": evidence.eval_batches(data["dev"], tokenizer, 16),
    }
    model = source(seed, sources / f"alpha{ALPHA}_r{SOURCE_RANK}_seed{seed}", data, tokenizer)
    record = {"seed": seed, "alpha": ALPHA, "lr": LR, "source": evidence.evaluate(model, test)["loss"]}
    originals = truncate_in_place(model, None, 0.0)
    record["svd"] = evidence.evaluate(model, test)["loss"]
    restore(model, originals)
    for split, batches in calibration.items():
        grams = input_grams(model, batches)
        for damping in DAMPINGS:
            originals = truncate_in_place(model, grams, damping)
            record[f"whitened {split} {damping:g}"] = evidence.evaluate(model, test)["loss"]
            restore(model, originals)
    return record


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    records = sorted(records, key=lambda r: r["seed"])
    keys = [key for key in records[0] if key == "svd" or key.startswith("whitened")]
    table = Table(
        title=f"generation task, lora_alpha={ALPHA}, r=64 at {LR:g} → rank {TARGET_RANK}: test NLL behind the "
        f"source, seeds {[r['seed'] for r in records]} (mean ± SE over seeds; per seed)"
    )
    for column in ("truncation", "behind the source", "per seed", "vs the SVD"):
        table.add_column(column, justify="left" if column == "truncation" else "right")
    for key in keys:
        behind = [r[key] - r["source"] for r in records]
        against = [r[key] - r["svd"] for r in records]
        spread = statistics.stdev(behind) / len(behind) ** 0.5 if len(behind) > 1 else float("nan")
        table.add_row(
            key,
            f"{statistics.mean(behind):+.4f} ± {spread:.4f}",
            " ".join(f"{b:+.4f}" for b in behind),
            f"{statistics.mean(against):+.4f}",
        )
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sources", default="whitened-sources", help="folder for the trained r=64 sources")
    parser.add_argument("--out", default="whitened-truncation.jsonl")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table_only:
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(args.threads)
        hf_logging.set_verbosity_error()
        evidence.use_task("generation")
        done = {json.loads(line)["seed"] for line in out.read_text().splitlines()} if out.exists() else set()
        for seed in (int(s) for s in args.seeds.split(",")):
            if seed in done:
                continue
            record = measure(seed, Path(args.sources))
            with out.open("a") as sink:
                sink.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print_table([json.loads(line) for line in out.read_text().splitlines()])


if __name__ == "__main__":
    main()
