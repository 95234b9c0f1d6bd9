"""TRL GRPOTrainer with the monitor: reinforce short, complete answers from SmolLM2-135M, watch its LoRA.

    python examples/trl_grpo_monitor.py [--quick] [--steps 20] [--out runs/trl_grpo]

The reward prefers completions of about twelve words that end a sentence. The SpectralMonitorCallback
reports the adapter's effective rank, conditioning and dominance over the base as GRPO trains it.
Offline: see offline_assets.py.

Cost on 2 CPU cores: about 100 s on quiet cores (an earlier measurement); with --quick (2 steps, completions
of at most 12 tokens) about 22 s of CPU time, under a minute on 2 quiet cores; on a busy machine (load 11) 8
min, or 2 min with OMP_NUM_THREADS=1. The first example run also converts SmolLM2 into the cache folder
(about a minute, once).

Writes into --out: lora_monitor.jsonl (the monitor's records) and adapter/, the LoRA GRPO trained. Reload it
with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "runs/trl_grpo/adapter"), base
being the cache folder's SmolLM2 recorded in its adapter_config.json (base_model_name_or_path).
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from offline_assets import news_texts, parse_sized_arguments, smollm2
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from lora_monitor.callbacks import SpectralMonitorCallback


def short_complete_answer(completions, **kwargs) -> list[float]:
    """1 for about twelve words ending with a full stop, less the further from that."""
    rewards = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = len(text.split())
        rewards.append(1.0 - min(abs(words - 12) / 12, 1.0) + (0.5 if text.strip().endswith(".") else 0.0))
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument(
        "--out",
        default="runs/trl_grpo",
        help="folder for everything the run writes (default: %(default)s, under the current folder)",
    )
    args = parse_sized_arguments(
        parser,
        {
            "steps": (20, 2, "training steps"),
            "max_completion_length": (24, 12, "tokens per generated completion, at most"),
        },
    )

    model, tokenizer = smollm2()
    # Conversational prompts, so that TRL applies SmolLM2's chat template (a bare string gets an instant EOS).
    prompts = [
        [{"role": "user", "content": text.split(". ")[0] + ". In one sentence, what happened?"}]
        for text in news_texts()[:64]
    ]
    monitor = SpectralMonitorCallback(every_n_steps=max(1, args.steps // 4))
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=short_complete_answer,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj"]),
        args=GRPOConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=args.max_completion_length,
            learning_rate=1e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        callbacks=[monitor],
    )
    trainer.train()
    trainer.save_model(
        f"{args.out}/adapter"
    )  # the LoRA alone (GRPOTrainer wrapped the model with peft_config)
    if monitor.latest_summary is not None:
        print({key: round(value, 4) for key, value in monitor.latest_scalars.items() if "mean" in key})
    for alert in monitor.alerts:
        print(alert)


if __name__ == "__main__":
    main()
