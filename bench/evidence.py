"""Evidence for LoRA-Squeeze at small scale: a real pretrained model, a real labelled task, 3 seeds.

    python bench/evidence.py [--steps 80] [--seeds 0,1,2] [--ranks 1,2,4,8,16,64] [--lr 3e-4]

all-MiniLM-L6-v2 (BERT, 22.7M parameters, pretrained) with LoRA on query/key/value/dense, classifying the 200
Pang & Lee movie-review sentences (positive/negative; 150 to train, 50 held out), offline (see
examples/offline_assets.py). Every condition gets the same number of optimizer steps:

  (a) direct:        LoRA r=8 trained for all steps
  (b) post-squeeze:  r=64 trained for all steps, then compressed to r=8 (compress_adapter, no more training)
  (c) cont-squeeze:  r=64, squeezed to 8 at 75% of the steps (InSqueezeCallback, one event), trained on at 8
  (d) in-squeeze:    r=64 annealed 64 → 32 → 16 → 8 between 30% and 60% of the steps
  (e) ranks:         direct training at each rank, next to the monitor's and the squeeze's recommendation
                     (from the r=64 run of (b)): where does held-out quality stop improving?

Prints held-out accuracy and loss, mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from offline_assets import minilm_classifier, polarity_sentences

TARGETS = ["query", "key", "value", "dense"]


def data(tokenizer, seed: int):
    from datasets import Dataset

    labelled = polarity_sentences()
    generator = torch.Generator().manual_seed(1234)  # one fixed split for every seed and condition
    order = torch.randperm(len(labelled), generator=generator).tolist()
    train = [labelled[i] for i in order[:150]]
    heldout = [labelled[i] for i in order[150:]]

    def encode(rows):
        encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=48, padding="max_length")
        encoded["labels"] = [label for _, label in rows]
        return Dataset.from_dict(dict(encoded))

    return encode(train), encode(heldout)


def model_with_lora(rank: int, seed: int):
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    base, tokenizer = minilm_classifier()
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=rank, target_modules=TARGETS)
    return get_peft_model(base, config), tokenizer


def train(model, dataset, steps: int, seed: int, lr: float, callbacks=()):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=lr,
        warmup_steps=max(1, steps // 10),
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


@torch.no_grad()
def evaluate(model, dataset) -> tuple[float, float]:
    """Held-out (accuracy, loss)."""
    model.eval()
    batch = {key: torch.tensor(dataset[key]) for key in ("input_ids", "attention_mask", "labels")}
    if "token_type_ids" in dataset.column_names:
        batch["token_type_ids"] = torch.tensor(dataset["token_type_ids"])
    output = model(**batch)
    accuracy = float((output.logits.argmax(-1) == batch["labels"]).float().mean())
    return accuracy, float(output.loss)


# The two In-Squeeze conditions: one squeeze to 8 at 75% (then Cont-Squeeze), or 64 → 32 → 16 → 8 over 30-60%.
SQUEEZE_SCHEDULES = {
    "cont-squeeze 64→8 at 75%": lambda steps: {"schedule": [(int(0.75 * steps), 8)]},
    "in-squeeze 64→8 (30-60%)": lambda steps: {"start_step": 0.3, "end_step": 0.6},
}


def run_condition(name: str, seed: int, steps: int, lr: float, train_set, heldout) -> dict:
    from peft import PeftModel

    from lora_monitor import compress_adapter
    from lora_monitor.callbacks import InSqueezeCallback, PostSqueezeCallback, SpectralMonitorCallback

    extra: dict = {}
    if name == "direct r=8":
        model, _ = model_with_lora(8, seed)
        train(model, train_set, steps, seed, lr)
    elif name == "r=64 (no squeeze)":
        model, _ = model_with_lora(64, seed)
        monitor = SpectralMonitorCallback(every_n_steps=steps, jsonl_name=None, log_alerts=False)
        post = PostSqueezeCallback(min_variance_retention=0.95, print_table=False)
        train(model, train_set, steps, seed, lr, [monitor, post])
        mean_effective_rank = statistics.mean(m.effective_rank for m in monitor.latest if not m.is_zero)
        extra = {
            "model": model,
            "monitor_rank": 2 ** math.ceil(math.log2(mean_effective_rank)),
            "mean_effective_rank": mean_effective_rank,
            "squeeze_rank": post.analysis.recommended_rank,
            "squeeze_rank_90": next(
                r for r in post.analysis.target_ranks if post.analysis.mean_variance[r] >= 0.9
            ),
        }
    elif name in SQUEEZE_SCHEDULES:
        model, _ = model_with_lora(64, seed)
        train(
            model,
            train_set,
            steps,
            seed,
            lr,
            [InSqueezeCallback(target_rank=8, **SQUEEZE_SCHEDULES[name](steps))],
        )
    elif name.startswith("direct r="):
        model, _ = model_with_lora(int(name.split("=")[1]), seed)
        train(model, train_set, steps, seed, lr)
    else:
        raise ValueError(name)
    accuracy, loss = evaluate(model, heldout)
    result = {"accuracy": accuracy, "loss": loss, **extra}
    if name == "r=64 (no squeeze)":
        with tempfile.TemporaryDirectory() as scratch:
            compress_adapter(model, Path(scratch) / "r8", target_rank=8, progress=False)
            base, _ = minilm_classifier()
            squeezed = PeftModel.from_pretrained(base, Path(scratch) / "r8")
            result["post"] = dict(zip(("accuracy", "loss"), evaluate(squeezed, heldout), strict=True))
    return result


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {deviation:.3f}"


def main() -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="1,2,4,8,16,64")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    _, tokenizer = minilm_classifier()
    train_set, heldout = data(tokenizer, 0)

    results: dict[str, list[dict]] = {}
    conditions = ["direct r=8", "r=64 (no squeeze)", "cont-squeeze 64→8 at 75%", "in-squeeze 64→8 (30-60%)"]
    for seed in seeds:
        for name in conditions:
            outcome = run_condition(name, seed, args.steps, args.lr, train_set, heldout)
            results.setdefault(name, []).append(outcome)
            if "post" in outcome:
                results.setdefault("post-squeeze 64→8", []).append(outcome["post"])
        for rank in [int(r) for r in args.ranks.split(",")]:
            if rank in (8, 64):
                continue  # already trained above
            results.setdefault(f"direct r={rank}", []).append(
                run_condition(f"direct r={rank}", seed, args.steps, args.lr, train_set, heldout)
            )

    console = Console()
    table = Table(
        title=f"MiniLM + LoRA on Pang & Lee polarity (150 train / 50 held out), {args.steps} steps, "
        f"lr {args.lr:g}, seeds {seeds}"
    )
    for column in ("condition", "held-out accuracy", "held-out loss"):
        table.add_column(column, justify="right" if column != "condition" else "left")
    order = [
        "direct r=8",
        "post-squeeze 64→8",
        "cont-squeeze 64→8 at 75%",
        "in-squeeze 64→8 (30-60%)",
        "r=64 (no squeeze)",
    ]
    for name in order:
        rows = results[name]
        table.add_row(name, spread([r["accuracy"] for r in rows]), spread([r["loss"] for r in rows]))
    table.add_section()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    rank_rows = {
        rank: results[
            "direct r=8" if rank == 8 else "r=64 (no squeeze)" if rank == 64 else f"direct r={rank}"
        ]
        for rank in ranks
    }
    for rank in ranks:
        table.add_row(
            f"direct r={rank}",
            spread([r["accuracy"] for r in rank_rows[rank]]),
            spread([r["loss"] for r in rank_rows[rank]]),
        )
    console.print(table)

    best = max(statistics.mean(r["accuracy"] for r in rank_rows[rank]) for rank in ranks)
    enough = min(
        rank for rank in ranks if statistics.mean(r["accuracy"] for r in rank_rows[rank]) >= best - 0.02
    )
    big = results["r=64 (no squeeze)"]
    console.print(
        f"Quality stops improving at rank {enough} (smallest rank within 2 points of the best mean accuracy).\n"
        f"From the r=64 runs: monitor's mean effective rank {spread([r['mean_effective_rank'] for r in big])} "
        f"→ rank {[r['monitor_rank'] for r in big]}; squeeze recommends {[r['squeeze_rank'] for r in big]} "
        f"at 95% retained variance, {[r['squeeze_rank_90'] for r in big]} at 90%.\n"
        f"Total time {time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
