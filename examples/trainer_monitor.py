"""Fine-tune SmolLM2-135M with LoRA in a plain transformers Trainer, watched by the monitor, squeezed at the end.

    python examples/trainer_monitor.py [--steps 60] [--rank 64] [--out runs/trainer_monitor]

Trains a rank-64 LoRA on 280 news articles (offline: model and texts come from PyPI packages, see
offline_assets.py), with SpectralMonitorCallback checking every few steps and PostSqueezeCallback writing
the variance table, the recommended rank and a compressed adapter at the end; then draws the report.
Runs in one process, or in several with `accelerate launch` (see accelerate_ddp.sh; accelerate_fsdp.sh runs it
sharded by FSDP2 on GPUs with --accelerator).
"""

from __future__ import annotations

import argparse

from offline_assets import causal_lm_dataset, news_texts, smollm2
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lora_monitor.callbacks import PostSqueezeCallback, SpectralMonitorCallback
from lora_monitor.render.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (default: %(default)s)")
    parser.add_argument(
        "--check-every",
        type=int,
        default=10,
        help="monitor check every this many steps (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="runs/trainer_monitor",
        help="folder for everything the run writes (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--accelerator", action="store_true", help="train on the GPU (default: the CPU)")
    args = parser.parse_args()

    model, tokenizer = smollm2()
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
        ),
    )
    train = causal_lm_dataset(tokenizer, news_texts()[:280])
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
