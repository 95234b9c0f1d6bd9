"""Tiny real models, data and Trainer arguments for the tests: built from configs, offline, fast on 2 cores.

Plain functions (a test calls them with its own seed and LoRA options); the fixtures in ``conftest.py``
wrap the shared ones. The one place the tests' tiny models are defined. The demo builds its own model
(``lora_monitor.callbacks.demo``): it is installed in the wheel, the tests are not, so it imports nothing
from here, and the tests' numbers do not move when the demo's model changes.
"""

from __future__ import annotations

from typing import Any

import torch

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


def tiny_llama_config(
    vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2, **overrides: Any
):
    """The ``LlamaConfig`` of a tiny Llama (4 heads, 2 key-value heads, MLP twice as wide, untied head);
    ``overrides`` replace any field."""
    from transformers import LlamaConfig

    fields = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**fields, **overrides})


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


class TinyConvNet(torch.nn.Module):
    """Two Conv2d layers (3×3 kernels), enough for PEFT's conv LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def tiny_conv_net(seed: int = 0) -> TinyConvNet:
    """A randomly initialised ``TinyConvNet`` (``seed`` fixes its weights), in eval mode."""
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def make_lm_dataset(tokenizer):
    """A tiny causal-LM dataset (``datasets.Dataset`` with input_ids/attention_mask/labels)."""
    from datasets import Dataset

    encoded = tokenizer(SENTENCES, padding="max_length", max_length=16, truncation=True)
    encoded["labels"] = [
        [tok if mask else -100 for tok, mask in zip(ids, att, strict=True)]
        for ids, att in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict(dict(encoded))


def training_args(output_dir, arguments_class=None, **overrides):
    """``TrainingArguments`` for fast, quiet, offline CPU runs; ``arguments_class`` gives one of its subclasses
    instead (TRL's ``SFTConfig``) with the same settings."""
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
    return (arguments_class or TrainingArguments)(**defaults)


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
