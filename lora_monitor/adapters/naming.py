"""What a LoRA module is called, each rule written once.

- what a module is: its type and layer index (:func:`describe_module`) and its block, attention, MLP or
  other (:func:`module_block`), the one grouping every table and scalar uses;
- the ``rank_pattern``/``alpha_pattern`` key PEFT matches to one module and no other (:func:`pattern_key`),
  and the key PEFT matches to a module among a config's keys (:func:`pattern_key_for`).
"""

from __future__ import annotations

import re

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")

ATTENTION_TYPES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "c_attn", "out_proj"}
)
MLP_TYPES = frozenset(
    {
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc1",
        "fc2",
        "c_fc",
        "w1",
        "w2",
        "w3",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "gate_up_proj",
        "intermediate.dense",
        "output.dense",
    }
)
BLOCKS = ("attention", "mlp", "other")


def pattern_key(name: str) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key that PEFT matches to module ``name`` and to no other.

    PEFT matches a key ``K`` as the regex ``(.*\\.)?(K)$`` against each module path: escaping the dots and
    anchoring at the start makes the key match exactly one full module path (``layers.1.q_proj`` would
    also match ``layers.11.q_proj``'s tail otherwise, and ``q_proj`` every q_proj).
    """
    return "^" + re.escape(name)


def describe_module(name: str) -> tuple[str, int | None]:
    """``(module type, layer index)`` of a module path: ``("q_proj", 3)`` for ``model.layers.3.self_attn.q_proj``."""
    match = _LAYER_INDEX.search(name)
    return name.rsplit(".", 1)[-1], int(match.group(1)) if match else None


def module_block(name: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` (embeddings, ``lm_head``, classifiers) for a module path.

    Attention: a q/k/v/o projection or its fused forms, or any module under an ``attn``/``attention`` parent.
    MLP: the feed-forward projections (``gate/up/down_proj``, ``fc1/2``, BERT's ``intermediate``/``output``
    dense) or anything under ``.mlp.``. Everything else is "other", never counted as MLP.
    """
    module_type, _ = describe_module(name)
    dotted = f".{name}."
    if module_type in ATTENTION_TYPES or "attn" in name or "attention" in name:
        return "attention"
    two_last = ".".join(name.rsplit(".", 2)[-2:])
    if module_type in MLP_TYPES or two_last in MLP_TYPES or ".mlp." in dotted or ".feed_forward." in dotted:
        return "mlp"
    return "other"


def pattern_key_for(pattern_keys: list[str], name: str) -> str:
    """The first ``rank_pattern``/``alpha_pattern`` key that PEFT matches to module ``name``, else ``name``.

    PEFT's own rule (``peft.utils.other.get_pattern_key``: the regex ``(.*\\.)?(KEY)$``), written here so that
    reading a saved adapter does not import PEFT and, through it, transformers; a test holds the two equal.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name
