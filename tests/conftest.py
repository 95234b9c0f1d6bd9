"""Shared test fixtures: the word-level tokenizer (trained in memory once per session) and the tiny LM dataset.

The models, data and Trainer arguments they build on are plain functions in ``tiny_models.py``.

Everything is offline and small enough for a 2-core CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import make_lm_dataset, word_tokenizer

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
