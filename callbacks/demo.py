"""``lora-monitor demo``: train a small model with LoRA at a high rank and show what the callbacks find.

Offline and CPU-only, about a minute on 2 cores. A tiny Llama (built from a config, randomly initialised)
is fine-tuned with a rank-32 LoRA on a small synthetic corpus. Run 1 carries the SpectralMonitorCallback
and the PostSqueezeCallback (which writes a compressed adapter); run 2 trains the same adapter with the
InSqueezeCallback annealing the rank down to the recommended one. The demo then reloads the compressed
adapter with PEFT and compares held-out losses.

What it writes under ``output_dir``: ``base/`` (the random base model and its tokenizer, saved first so
that every adapter records it in ``base_model_name_or_path``), ``heldout.txt`` (the held-out texts, one per
line, for ``lora-monitor squeeze --base --data``), ``run1/`` (``adapter/``, ``squeezed/``,
``lora_monitor.jsonl``, ``squeeze_manifest.json``, the report) and ``run2/adapter/``. Each adapter reloads
as written: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``.

This is the one module under ``lora_monitor/`` that drives a ``Trainer``; nothing in the core imports it.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from transformers import LlamaConfig

SOURCE_RANK = 32
SUBJECTS = ["the model", "a small adapter", "the frozen base", "our optimizer", "the monitor", "each layer"]
VERBS = ["learns", "updates", "compresses", "watches", "squeezes", "keeps"]
OBJECTS = ["a low rank delta", "the singular values", "most of the energy", "the training loss", "its rank"]
ENDINGS = ["every step", "after training", "while training", "at the end", "without a hub"]


def demo_corpus(count: int = 256, seed: int = 0) -> list[str]:
    """Synthetic sentences with a small grammar: a task that needs far less than rank 32."""
    chooser = random.Random(seed)
    return [
        f"{chooser.choice(SUBJECTS)} {chooser.choice(VERBS)} {chooser.choice(OBJECTS)} {chooser.choice(ENDINGS)}"
        for _ in range(count)
    ]


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _dataset(tokenizer, texts: list[str]) -> list[dict[str, list[int]]]:
    """Padded token blocks with labels (padding masked with -100): a plain list is all a Trainer needs."""
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    return [
        {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": [t if keep else -100 for t, keep in zip(ids, mask, strict=True)],
        }
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]


def demo_model_config(vocab_size: int) -> LlamaConfig:
    """The demo's tiny Llama: 2 layers, hidden 128, 4 heads (2 key-value), MLP twice as wide, untied head.

    The demo's own (the tests build theirs in tests/tiny_models.py: the demo is installed, the tests are not).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def save_base_model(folder: Path, tokenizer) -> Path:
    """The demo's random base model (a tiny Llama, seed 0) and its tokenizer, saved to ``folder``; returns
    its absolute path, which every adapter trained on it records in ``base_model_name_or_path``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(demo_model_config(len(tokenizer)))
    folder = folder.resolve()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _base_model(base_folder: Path):
    from transformers import AutoModelForCausalLM

    # Loaded from its folder, so that PEFT records the folder as the adapter's base_model_name_or_path.
    return AutoModelForCausalLM.from_pretrained(base_folder)


def _peft_model(base_folder: Path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=SOURCE_RANK,
        lora_alpha=SOURCE_RANK,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    base = _base_model(base_folder)
    torch.manual_seed(0)  # the same LoRA initialisation in both runs
    return get_peft_model(base, config)


def _train(model, dataset, output_dir: Path, steps: int, callbacks: list[Any], verbose: bool = False):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        max_steps=steps,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=callbacks)
    if not verbose:
        trainer.remove_callback(PrinterCallback)  # the demo prints its own summary, not every log dict
    trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run_demo(
    output_dir: str | os.PathLike = "lora-monitor-demo", steps: int = 60, verbosity: str = "normal"
) -> dict[str, Any]:
    """Run the demo and print its findings; returns the figures it printed (for tests and scripts).

    ``verbosity``: ``"quiet"`` prints the summary alone, ``"normal"`` the tables, the alerts (each once) and
    the summary, ``"verbose"`` also the Trainer's log lines and lora-monitor's debug messages.
    """
    from lora_monitor._output import VERBOSITIES, quiet_third_party, transformers_progress_bars
    from lora_monitor.errors import LoraMonitorError, check_number
    from lora_monitor.in_squeeze.options import check_choice

    check_choice(verbosity, VERBOSITIES, "verbosity")
    # 0 or fewer would train by epochs (the Trainer's max_steps=-1) or stop half-written; checked first
    steps = int(check_number(steps, "steps", low=1, whole=True, where="demo"))
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise LoraMonitorError(f"{output}: is a file; the demo writes its run into a folder (--out)")
    with quiet_third_party(), transformers_progress_bars(verbosity == "verbose"):
        return _run_demo(output, steps, verbosity)


def _run_demo(output: Path, steps: int, verbosity: str) -> dict[str, Any]:
    from peft import PeftModel

    from lora_monitor.callbacks import InSqueezeCallback, PostSqueezeCallback, SpectralMonitorCallback
    from lora_monitor.edit import calibration_batches, evaluate_loss

    verbose, quiet = verbosity == "verbose", verbosity == "quiet"
    if not verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    console = Console(quiet=quiet)  # quiet: only the summary, printed below by a console that is not
    texts = demo_corpus()
    train_texts, heldout_texts = texts[:224], texts[224:]
    tokenizer = _tokenizer(texts)
    train_data = _dataset(tokenizer, train_texts)
    heldout = calibration_batches(heldout_texts, tokenizer, batch_size=16)
    base_folder = save_base_model(output / "base", tokenizer)
    (output / "heldout.txt").write_text("\n".join(heldout_texts) + "\n")

    console.rule(f"[bold]Run 1: LoRA r={SOURCE_RANK}, {steps} steps, SpectralMonitor + PostSqueeze")
    # The alerts are listed once below, with the rest of what the monitor saw: not logged as they come too.
    monitor = SpectralMonitorCallback(every_n_steps=max(1, steps // 6), log_alerts=False)
    # The held-out texts check each candidate rank by its loss: the recommendation a user should act on.
    post = PostSqueezeCallback(
        min_variance_retention=0.95, compress=True, print_table=not quiet, eval_batches=heldout
    )
    model = _peft_model(base_folder)
    trainer = _train(model, train_data, output / "run1", steps, [monitor, post], verbose)
    model.save_pretrained(output / "run1" / "adapter")
    losses = _losses(trainer)

    table = Table(title="What the monitor saw at the last check (per module type)")
    for column in ("module type", "rank", "effective rank ΔW", "utilization", "stable rank", "κ(A)", "κ(B)"):
        table.add_column(column, justify="right")
    by_type: dict[str, list[Any]] = {}
    for record in monitor.latest:
        by_type.setdefault(record.module_type, []).append(record)
    for module_type, records in by_type.items():

        def mean(attribute: str, records=records) -> float:
            values = [getattr(r, attribute) for r in records if getattr(r, attribute) is not None]
            return sum(values) / max(len(values), 1)

        table.add_row(
            module_type,
            str(records[0].nominal_rank),
            f"{mean('effective_rank'):.1f}",
            f"{mean('rank_utilization'):.0%}",
            f"{mean('stable_rank'):.2f}",
            f"{mean('kappa_A'):.1f}",
            f"{mean('kappa_B'):.1f}",
        )
    console.print(table)
    if monitor.alerts:
        console.print(f"[bold]{len(monitor.alerts)} alert(s):")
        for alert in monitor.alerts:
            console.print(f"  • {alert}", highlight=False, markup=False)  # "[critical]" is text, not markup
    else:
        console.print("No alerts.")

    analysis = post.analysis
    energy_rank = analysis.recommended_rank if analysis is not None else None
    recommended = post.function.recommended_rank if post.function is not None else energy_rank
    compressed_folder = output / "run1" / post.output_subdir
    figures: dict[str, Any] = {
        "source_rank": SOURCE_RANK,
        "recommended_rank": recommended,
        "energy_rank": energy_rank,
        "alerts": [alert.to_dict() for alert in monitor.alerts],
        "run1_final_loss": losses[-1] if losses else None,
        "heldout_loss_source": evaluate_loss(model, heldout),
        "base_model": str(base_folder),
    }
    if recommended is not None and compressed_folder.is_dir():
        reloaded = PeftModel.from_pretrained(_base_model(base_folder), compressed_folder)
        figures["heldout_loss_compressed"] = evaluate_loss(reloaded, heldout)
        console.print(
            f"Compressed adapter (rank {recommended}) written to {compressed_folder} and reloaded with PEFT: "
            f"held-out loss {figures['heldout_loss_compressed']:.4f} vs {figures['heldout_loss_source']:.4f} "
            f"at rank {SOURCE_RANK}."
        )

    # InSqueezeCallback refuses a target at or above the adapter's rank (nothing to squeeze).
    target = recommended if recommended and recommended < SOURCE_RANK else 8
    console.rule(f"[bold]Run 2: the same training with InSqueeze {SOURCE_RANK} → {target}")
    squeezer = InSqueezeCallback(target_rank=target, start_step=0.3, end_step=0.6)
    model2 = _peft_model(base_folder)
    trainer2 = _train(model2, train_data, output / "run2", steps, [squeezer], verbose)
    model2.save_pretrained(output / "run2" / "adapter")
    for event in squeezer.events:
        retained = list(event["retained_variance"].values())
        console.print(
            f"  step {event['step']}: {event['modules_squeezed']} modules squeezed to rank ≤ {event['rank_cap']}, "
            f"retained variance ≥ {min(retained):.1%}, loss {event['loss_before']:.3f} → {event['loss_after']:.3f}",
            highlight=False,
        )
    figures["heldout_loss_in_squeeze"] = evaluate_loss(model2, heldout)
    figures["run2_final_loss"] = (_losses(trainer2) or [None])[-1]

    from lora_monitor.render.report import write_report

    figures["report"] = str(write_report(output / "run1"))
    summary = Console()
    summary.rule("[bold]Summary")
    summary.print(
        f"Trained at rank {SOURCE_RANK}; Post-Squeeze recommends rank {recommended} "
        + (
            f"(the smallest rank {post.function.rule_text}; "
            if post.function is not None
            else "(the energy rank: no held-out loss was measured; "
        )
        + f"the 95%-energy rank, an upper bound, is {energy_rank}).\n"
        f"Held-out loss: rank {SOURCE_RANK} {figures['heldout_loss_source']:.4f}"
        + (
            f", Post-Squeeze to {recommended} {figures['heldout_loss_compressed']:.4f}"
            if "heldout_loss_compressed" in figures
            else ""
        )
        + f", In-Squeeze to {target} {figures['heldout_loss_in_squeeze']:.4f}.\n"
        f"Everything is in {output}/: the base model ({base_folder.name}/), the monitor JSONL, the squeeze "
        f"manifest and the adapters; plots and the HTML report: {figures['report']}.\n"
        f"{len(monitor.alerts)} alert(s) in run 1. "
        "(The base here is a randomly initialised Llama, since nothing is downloaded: its weights are small, "
        "so the adapter soon dominates them. That is what the dominance alerts are saying.)",
        highlight=False,
    )
    # soft_wrap: lines a user copies, never broken inside a path
    summary.print(
        "Reload an adapter: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
        f"'{output / 'base'}'), '{output / 'run1' / 'adapter'}')\n"
        f"or: lora-monitor squeeze {output / 'run1' / 'adapter'} --base {output / 'base'} "
        f"--data {output / 'heldout.txt'}",
        highlight=False,
        soft_wrap=True,
    )
    return figures
