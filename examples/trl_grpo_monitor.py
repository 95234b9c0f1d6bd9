"""TRL GRPOTrainer with the monitor: reinforce short, complete answers from SmolLM2-135M, watch its LoRA.

    python examples/trl_grpo_monitor.py [--steps 20] [--out runs/trl_grpo]

The reward prefers completions of about twelve words that end a sentence. The SpectralMonitorCallback
reports the adapter's effective rank, conditioning and dominance over the base as GRPO trains it.
Offline: see offline_assets.py.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from offline_assets import news_texts, smollm2
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
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument(
        "--out",
        default="runs/trl_grpo",
        help="folder for everything the run writes (default: %(default)s, under the current folder)",
    )
    args = parser.parse_args()

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
            max_completion_length=24,
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
    if monitor.latest_summary is not None:
        print({key: round(value, 4) for key, value in monitor.latest_scalars.items() if "mean" in key})
    for alert in monitor.alerts:
        print(alert)


if __name__ == "__main__":
    main()
