"""Shared test fixtures: the word-level tokenizer (trained in memory once per session), the tiny LM dataset
and a saved adapter with a decaying spectrum; the markers each test file gets.

The tests sit in one folder per feature of the package; the helpers they share sit here, beside this file,
and import by name (pyproject's ``pythonpath``): ``tiny_models.py`` (the tiny models, data and Trainer
arguments), ``dense_reference.py`` (independent dense references), ``offline_wandb.py`` (reading an offline
W&B run), ``squeeze_command.py`` (the command in this process), ``offline_run.py`` (a script in a child
process) and ``distributed_workers/`` (multi-process runs). Test file names are unique across folders (no
``__init__.py``: the checkout stays off ``sys.path``, so ``.ci/minimum-versions`` tests the installed wheel).

Everything is offline and small enough for a 2-core CPU; ``-m "not slow"`` leaves out the tests over ~2 s.
"""

from __future__ import annotations

import os

import pytest
import torch
from dense_reference import decay_spectrum
from tiny_models import make_lm_dataset, peft_llama, word_tokenizer

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


# The "minimum versions" subset (.ci/minimum-versions runs `pytest -m minversions` against the oldest
# transformers, PEFT, Accelerate, TRL and datasets that pyproject.toml admits): the monitor, In-Squeeze and
# Post-Squeeze in a Trainer and in TRL, and the command on a saved adapter. `python -m pytest tests` runs
# them with everything else.
MINIMUM_VERSIONS_FILES = frozenset(
    {
        "test_smoke_trainer.py",
        "test_monitor_callback.py",
        "test_in_squeeze_callback.py",
        "test_post_squeeze_callback.py",
        "test_squeeze_cli.py",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MINIMUM_VERSIONS_FILES:
            item.add_marker(pytest.mark.minversions)


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer trained in memory on the test sentences, as a transformers tokenizer."""
    return word_tokenizer()


@pytest.fixture()
def lm_dataset(tokenizer):
    """A tiny causal-LM dataset (``datasets.Dataset`` with input_ids/attention_mask/labels)."""
    return make_lm_dataset(tokenizer)


@pytest.fixture()
def adapter_folder(tmp_path):
    """A saved rank-16 adapter (``lora_alpha`` 32) of the tiny Llama, with clearly separated singular values."""
    folder = tmp_path / "adapter"
    decay_spectrum(peft_llama(0, r=16, lora_alpha=32)).save_pretrained(folder)
    return folder
