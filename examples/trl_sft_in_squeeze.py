"""TRL SFTTrainer with In-Squeeze: train SmolLM2-135M's LoRA at rank 64 and anneal it to rank 8 while training.

    python examples/trl_sft_in_squeeze.py [--quick] [--steps 60] [--rank 64] [--target-rank 8] [--out runs/trl_sft]

The rank halves at evenly spaced steps between 30% and 60% of training (64 → 32 → 16 → 8, optimizer
moments carried over), then training goes on at rank 8 ("Cont-Squeeze"). Offline: see offline_assets.py.

Cost on 2 CPU cores: about 100 s on quiet cores (an earlier measurement); with --quick (8 steps, 32-token
sequences, the same three halvings) about 28 s of CPU time, under a minute on 2 quiet cores; on a busy
machine (load 11) 16 min, or 3 min with OMP_NUM_THREADS=1. The first example run also converts SmolLM2 into
the cache folder (about a minute, once).

Writes into --out: lora_monitor.jsonl and adapter/, at rank 8 (its config says r=8). Reload it with
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "runs/trl_sft/adapter"), base being
the cache folder's SmolLM2 recorded in its adapter_config.json (base_model_name_or_path).
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from offline_assets import news_texts, parse_sized_arguments, smollm2
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from lora_monitor import find_lora_modules
from lora_monitor.callbacks import InSqueezeCallback, SpectralMonitorCallback


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank at the start (default: %(default)s)")
    parser.add_argument(
        "--target-rank", type=int, default=8, help="LoRA rank In-Squeeze ends at (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default="runs/trl_sft",
        help="folder for everything the run writes (default: %(default)s, under the current folder)",
    )
    args = parse_sized_arguments(
        parser,
        {
            "steps": (60, 8, "training steps"),
            "check_every": (10, 4, "monitor check every this many steps"),
            "max_length": (64, 32, "tokens per training sequence"),
        },
    )

    model, tokenizer = smollm2()
    squeeze = InSqueezeCallback(
        target_rank=args.target_rank, schedule="geometric", start_step=0.3, end_step=0.6
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": news_texts()[:280]}),
        peft_config=LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj", "o_proj"]
        ),
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            max_length=args.max_length,
            learning_rate=5e-4,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        callbacks=[squeeze, SpectralMonitorCallback(every_n_steps=args.check_every)],
    )
    trainer.train()
    for event in squeeze.events:
        print(
            f"step {event['step']}: rank ≤ {event['rank_cap']}, loss {event['loss_before']:.3f} → {event['loss_after']:.3f}"
        )
    ranks = sorted({module.rank for module in find_lora_modules(trainer.model)})
    print(f"final LoRA ranks: {ranks}")
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(f"{args.out}/adapter")


if __name__ == "__main__":
    main()
