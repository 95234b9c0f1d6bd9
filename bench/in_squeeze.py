"""In-Squeeze benchmark: what one squeeze costs against a training step, and what it does to the loss.

    python bench/in_squeeze.py            # both tables (a few minutes on a 2-core CPU)
    python bench/in_squeeze.py --quick    # smaller runs, for a smoke test
    python bench/in_squeeze.py --only cost --threads 1

Table 1 trains a small Llama (hidden 256, 4 layers, LoRA r=32 on all 7 projections) with one squeeze
32 → 8 and reports the squeeze's own time (``squeeze_model``, not the loss probes) against the mean time of
the run's other steps, for the exact factored route ("qr") and the randomized SVD ("rsvd").

Table 2 trains a tiny Llama on a learnable synthetic language (a fixed random bigram chain) at r=16,
squeezed 16 → 8 → 4 over steps 30-60, to step 90: the final loss (mean of the last 10 steps) with the Adam
moments projected through the factor maps, reset, and without any squeeze (rank 16 throughout), for 3 seeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lora_monitor.callbacks.in_squeeze import InSqueezeCallback  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(seed: int, hidden: int, layers: int, vocab: int, rank: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))


def bigram_dataset(seed: int, vocab: int, rows: int, length: int) -> Dataset:
    """Sequences from a fixed random bigram chain with a few likely successors per token: learnable."""
    generator = torch.Generator().manual_seed(1000 + seed)
    logits = torch.randn(vocab, vocab, generator=generator) * 3.0
    transition = torch.softmax(logits, dim=-1)
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(3, vocab, (rows,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = torch.multinomial(transition[tokens[:, position - 1]], 1, generator=generator)[
            :, 0
        ]
    ids = tokens.tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, step), keyed by step number."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before InSqueezeCallback's on_step_end (callbacks run in order): the squeeze is not in here.
        self.seconds[state.global_step] = time.perf_counter() - self._began


def train(model, data, output_dir, callbacks, max_steps: int, batch: int, seed: int, lr: float) -> Trainer:
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
        log_level="error",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the tables are the output, not the per-step log lines
    trainer.train()
    return trainer


def squeeze_cost(method: str, quick: bool, workdir: str) -> dict[str, float]:
    hidden, layers, rank, steps, batch, length = (128, 2, 16, 12, 4, 32) if quick else (256, 4, 32, 24, 8, 64)
    model = build_model(0, hidden, layers, vocab=512, rank=rank)
    data = bigram_dataset(0, vocab=512, rows=64, length=length)
    timer = StepTimer()
    event_step = steps // 2
    squeeze = InSqueezeCallback(target_rank=rank // 4, schedule=[(event_step, rank // 4)], method=method)
    train(model, data, workdir, [timer, squeeze], max_steps=steps, batch=batch, seed=0, lr=3e-3)
    # The first steps warm up allocators and kernels; the step right after the squeeze is left out too.
    normal = [s for step, s in timer.seconds.items() if step > 2 and step != event_step + 1]
    event = squeeze.events[0]
    return {
        "modules": float(event["modules_squeezed"]),
        "rank": float(rank),
        "step": statistics.mean(normal),
        "squeeze": event["squeeze_seconds"],
        "with_probes": event["seconds"],
    }


def final_loss(variant: str, seed: int, quick: bool, workdir: str) -> float:
    steps = 30 if quick else 90
    model = build_model(seed, hidden=64, layers=2, vocab=128, rank=16)
    data = bigram_dataset(seed, vocab=128, rows=64, length=16)
    callbacks = []
    if variant != "none":
        method, optimizer_state = variant.split("/")
        callbacks.append(
            InSqueezeCallback(
                target_rank=4,
                start_step=steps // 3,
                end_step=2 * steps // 3,
                method=method,
                optimizer_state=optimizer_state,
            )
        )
    trainer = train(model, data, workdir, callbacks, max_steps=steps, batch=8, seed=seed, lr=1e-2)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return statistics.mean(losses[-10:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not a measurement)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--only", choices=("cost", "loss"), default=None, help="print one of the two tables")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    hf_logging.set_verbosity_error()
    console = Console(width=120)
    workdir = tempfile.mkdtemp(prefix="in_squeeze_bench_")

    threads = torch.get_num_threads()
    if options.only != "loss":
        print_cost_table(console, options.quick, workdir, threads)
    if options.only != "cost":
        print_loss_table(console, options.quick, options.seeds, workdir)


def print_cost_table(console: Console, quick: bool, workdir: str, threads: int) -> None:
    cost = Table(title=f"One squeeze event vs. a training step (same run, {threads} CPU threads)")
    for column in (
        "method",
        "modules",
        "rank",
        "mean step s",
        "squeeze s",
        "squeeze / step",
        "with loss probes s",
    ):
        cost.add_column(column, justify="right")
    for method in ("qr", "rsvd"):
        result = squeeze_cost(method, quick, workdir)
        cost.add_row(
            method,
            f"{result['modules']:.0f}",
            f"{result['rank']:.0f} → {result['rank'] / 4:.0f}",
            f"{result['step']:.4f}",
            f"{result['squeeze']:.4f}",
            f"{result['squeeze'] / result['step']:.2f}",
            f"{result['with_probes']:.4f}",
        )
    console.print(cost)


def print_loss_table(console: Console, quick: bool, seeds: int, workdir: str) -> None:
    variants = ["none", "qr/project", "qr/reset", "rsvd/project"]
    losses = {
        variant: [final_loss(variant, seed, quick, workdir) for seed in range(seeds)] for variant in variants
    }
    table = Table(title="Final training loss (mean of the last 10 steps), r 16 → 4 In-Squeeze")
    table.add_column("variant")
    for seed in range(seeds):
        table.add_column(f"seed {seed}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("vs. no squeeze", justify="right")
    baseline = statistics.mean(losses["none"])
    for variant in variants:
        mean = statistics.mean(losses[variant])
        label = "no squeeze (r=16)" if variant == "none" else variant.replace("/", ", ")
        table.add_row(label, *(f"{v:.4f}" for v in losses[variant]), f"{mean:.4f}", f"{mean / baseline:.3f}×")
    console.print(table)


if __name__ == "__main__":
    main()
