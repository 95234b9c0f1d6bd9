"""Fine-tune SmolLM2-135M with LoRA in a plain transformers Trainer, watched by the monitor, squeezed at the end.

    python examples/trainer_monitor.py [--quick] [--steps 60] [--rank 64] [--out runs/trainer_monitor]

Trains a rank-64 LoRA on 280 news articles (offline: model and texts come from PyPI packages, see
offline_assets.py), with SpectralMonitorCallback checking every few steps and PostSqueezeCallback writing
the variance table, the recommended rank and a compressed adapter at the end; then draws the report.
Runs in one process, or in several with `accelerate launch` (see accelerate_ddp.sh; accelerate_fsdp.sh runs it
sharded by FSDP2 on GPUs with --accelerator).

Cost on 2 CPU cores: about 100 s on quiet cores (an earlier measurement); with --quick (4 steps, 32-token
sequences) about 30 s of CPU time, under a minute on 2 quiet cores; on a busy machine (load 11) 13 min, or 4
min with OMP_NUM_THREADS=1. The first example run also converts SmolLM2 into the cache folder (about a
minute, once).

Writes into --out: lora_monitor.jsonl, squeeze_manifest.json, report.html and its plots, adapter/ (rank 64)
and squeezed/ (the recommended rank). Reload either adapter with
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "runs/trainer_monitor/adapter"),
base being the cache folder's SmolLM2 recorded in its adapter_config.json (base_model_name_or_path).
"""

from __future__ import annotations

import argparse

from offline_assets import causal_lm_dataset, news_texts, parse_sized_arguments, smollm2
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lora_monitor.callbacks import PostSqueezeCallback, SpectralMonitorCallback
from lora_monitor.render.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (default: %(default)s)")
    parser.add_argument(
        "--out",
        default="runs/trainer_monitor",
        help="folder for everything the run writes (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--accelerator", action="store_true", help="train on the GPU (default: the CPU)")
    args = parse_sized_arguments(
        parser,
        {
            "steps": (60, 4, "training steps"),
            "check_every": (10, 2, "monitor check every this many steps"),
            "max_length": (64, 32, "tokens per training sequence"),
        },
    )

    model, tokenizer = smollm2()
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
        ),
    )
    train = causal_lm_dataset(tokenizer, news_texts()[:280], max_length=args.max_length)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            learning_rate=5e-4,
            logging_steps=max(1, args.check_every),
            save_strategy="no",
            report_to=[],
            use_cpu=not args.accelerator,
            disable_tqdm=True,
        ),
        train_dataset=train,
        callbacks=[
            SpectralMonitorCallback(every_n_steps=args.check_every),
            PostSqueezeCallback(min_variance_retention=0.95, compress=True),
        ],
    )
    trainer.train()
    # Every process: under FSDP the adapter is gathered from the shards first; only the main process writes.
    trainer.save_model(f"{args.out}/adapter")
    if trainer.is_world_process_zero():
        print(f"report: {write_report(args.out)}")


if __name__ == "__main__":
    main()
