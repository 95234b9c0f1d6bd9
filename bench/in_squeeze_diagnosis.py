"""Why does In-Squeeze collapse at a fixed lora_alpha?  Factor norms, update norms and the loss around each
squeeze, for lora_alpha = r and lora_alpha = 16 side by side (issue 28).

    python bench/in_squeeze_diagnosis.py --runs "64:0.0003:rank,16:0.002:rank,16:0.002:none" --out diag.jsonl
    python bench/in_squeeze_diagnosis.py --table-only --out diag.jsonl

Each run is MiniLM on the Rotten Tomatoes split of ``bench/evidence.py`` (seed 0, 120 steps, batch 16), a
rank-64 LoRA with ``lora_alpha`` ALPHA at learning rate LR, and ``InSqueezeCallback(target_rank=8,
lr_scaling=SCALING)``. At every step, over the LoRA modules: mean ‖B‖F, mean ‖A‖F, the mean Frobenius norm
of what the optimizer step did to ``ΔW = s·B·A`` (measured between the step's start and its end, before a
squeeze), the mean of that step relative to ‖ΔW‖F, and the training loss. Each run appends one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # the task, data and training loop of the evidence grid


def delta_weights(model) -> dict[str, torch.Tensor]:
    from lora_monitor.adapters import find_lora_modules, live_factors

    out = {}
    for record in find_lora_modules(model):
        B, A = live_factors(record.module, record.adapter_name)
        out[record.name] = (record.scale * (B.detach().double() @ A.detach().double())).clone()
    return out


def factor_norms(model) -> tuple[float, float]:
    from lora_monitor.adapters import find_lora_modules, live_factors

    norms_B, norms_A = [], []
    for record in find_lora_modules(model):
        B, A = live_factors(record.module, record.adapter_name)
        norms_B.append(float(B.detach().norm()))
        norms_A.append(float(A.detach().norm()))
    return statistics.fmean(norms_B), statistics.fmean(norms_A)


def recorder_class():
    from transformers import TrainerCallback

    class FactorRecorder(TrainerCallback):
        """Placed before InSqueezeCallback: its on_step_end sees the factors before that step's squeeze."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self._start: dict[str, torch.Tensor] = {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self._start = delta_weights(model)
            norm_B, norm_A = factor_norms(model)
            self.rows.append({"step": state.global_step + 1, "B_start": norm_B, "A_start": norm_A})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            end = delta_weights(model)
            steps = [float((end[name] - self._start[name]).norm()) for name in end]
            relative = [
                float((end[name] - self._start[name]).norm() / max(float(end[name].norm()), 1e-12))
                for name in end
            ]
            norm_B, norm_A = factor_norms(model)
            self.rows[-1].update(
                B_end=norm_B,
                A_end=norm_A,
                update=statistics.fmean(steps),
                relative_update=statistics.fmean(relative),
                delta_norm=statistics.fmean(float(d.norm()) for d in end.values()),
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.rows:
                self.rows[-1]["loss"] = logs["loss"]

    return FactorRecorder


def run(alpha: int, lr: float, scaling: str, data, tokenizer, dev, test) -> dict:
    from lora_monitor.callbacks import InSqueezeCallback

    seed = 0
    model = evidence.lora_model(evidence.SOURCE_RANK, alpha, seed)
    recorder = recorder_class()()
    callbacks = [recorder]
    if scaling != "direct":
        callbacks.append(InSqueezeCallback(target_rank=evidence.TARGET_RANK, lr_scaling=scaling))
    started = time.perf_counter()
    evidence.train(model, data["train"], tokenizer, seed, lr, callbacks, logging_steps=1)
    squeezes = [{"step": step} for step in sorted(getattr(callbacks[-1], "plan", {}))]
    return {
        "alpha": alpha,
        "lr": lr,
        "scaling": scaling,
        "seconds": time.perf_counter() - started,
        "squeezes": squeezes,
        "rows": recorder.rows,
        "dev": evidence.evaluate(model, dev)["accuracy"],
        "test": evidence.evaluate(model, test)["accuracy"],
    }


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for record in records:
        steps = {s["step"] for s in record["squeezes"]}
        title = (
            f"α={record['alpha']} lr={record['lr']:g} lr_scaling={record['scaling']}: test "
            f"{100 * record['test']:.2f}%, squeezes at steps {sorted(steps)}"
        )
        table = Table(title=title)
        for column in ("step", "loss", "‖B‖F start→end", "‖A‖F start→end", "‖step ΔW‖F", "step/‖ΔW‖"):
            table.add_column(column, justify="right")
        shown = set()
        for s in steps:
            shown |= {s - 1, s, s + 1, s + 2, s + 5}
        shown |= {1, 12, 24, 35, 60, 90, 120}
        for row in record["rows"]:
            if row["step"] not in shown or "update" not in row:
                continue
            mark = " ◀ squeeze" if row["step"] in steps else ""
            table.add_row(
                f"{row['step']}{mark}",
                f"{row.get('loss', float('nan')):.3f}",
                f"{row['B_start']:.3f}→{row['B_end']:.3f}",
                f"{row['A_start']:.3f}→{row['A_end']:.3f}",
                f"{row['update']:.2e}",
                f"{row['relative_update']:.2e}",
            )
        console.print(table)
        losses = [row.get("loss", float("nan")) for row in record["rows"]]
        compared = evidence.lost_progress_watch(losses, steps).comparison() if steps else None
        if compared:
            console.print(
                f"  lost-progress check: loss after the last squeeze {compared.loss_after:.4f}, before the first "
                f"{compared.reference_loss:.4f}: {compared.increase:+.4f} = "
                f"{compared.increase / compared.standard_error:+.2f} SE (it fires above +2)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="64:0.0003:rank,16:0.002:rank,16:0.002:none")
    parser.add_argument("--out", default="in-squeeze-diagnosis.jsonl")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table_only:
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(args.threads)
        hf_logging.set_verbosity_error()
        _, tokenizer = evidence.base_model()
        data = evidence.splits(tokenizer)
        dev = evidence.eval_batches(data["dev"], tokenizer)
        test = evidence.eval_batches(data["test"], tokenizer)
        for spec in args.runs.split(","):
            alpha, lr, scaling = spec.split(":")
            record = run(int(alpha), float(lr), scaling, data, tokenizer, dev, test)
            with out.open("a") as sink:
                sink.write(json.dumps(record) + "\n")
            print(f"{spec}: test {record['test']:.4f} ({record['seconds']:.0f} s)", flush=True)
    print_table([json.loads(line) for line in out.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
