"""Tiny real models, data and Trainer arguments for the tests: built from configs, offline, fast on 2 cores.

Plain functions (a test calls them with its own seed and LoRA options); the fixtures in ``conftest.py``
wrap the shared ones. The tiny Llama config is the demo's (``lora_monitor.callbacks.demo``).
"""

from __future__ import annotations

import torch

from lora_monitor.callbacks.demo import tiny_llama_config

SENTENCES = [
    "the adapter learns a small update to a frozen weight",
    "low rank factors multiply to give the delta",
    "a monitor watches the singular values while training",
    "squeeze the rank after training and keep most of the energy",
    "the base model stays frozen and the adapter trains",
    "effective rank tells how many directions are used",
    "a good alpha keeps the update scale in range",
    "training loss falls as the adapter fits the text",
] * 4


def tiny_llama(seed: int = 0, **config_overrides):
    """A randomly initialised 2-layer Llama (hidden 64; ``config_overrides`` change it): a real ``LlamaForCausalLM``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()


def peft_llama(seed: int = 0, init_lora_weights=False, **lora_kwargs):
    """A tiny Llama with a real PEFT LoRA adapter (non-zero B unless ``init_lora_weights=True``)."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("r", 8)
    lora_kwargs.setdefault("lora_alpha", 16)
    lora_kwargs.setdefault(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(init_lora_weights=init_lora_weights, **lora_kwargs))


def make_lm_dataset(tokenizer):
    """A tiny causal-LM dataset (``datasets.Dataset`` with input_ids/attention_mask/labels)."""
    from datasets import Dataset

    encoded = tokenizer(SENTENCES, padding="max_length", max_length=16, truncation=True)
    encoded["labels"] = [
        [tok if mask else -100 for tok, mask in zip(ids, att, strict=True)]
        for ids, att in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict(dict(encoded))


def training_args(output_dir, **overrides):
    """``TrainingArguments`` for fast, quiet, offline CPU runs."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_steps=10,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def word_tokenizer():
    """A word-level tokenizer trained in memory on the test sentences, as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"], vocab_size=128)
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # What a causal LM's tokenizer returns (Llama's): no token_type_ids, which generate() refuses.
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = (
        "{% for message in messages %}{{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}{% endif %}"
    )
    return tok
