"""The rules that name and scale a LoRA module, each written once.

- the scale ``s`` of ``ΔW = s·B@A``: ``α/r``, or ``α/√r`` with rsLoRA (:func:`scale_for` reads it from a saved
  config exactly as PEFT applies ``rank_pattern``/``alpha_pattern``);
- the alpha that keeps a scale at another rank (:func:`alpha_for_scale`, :func:`alpha_at_rank`): never an
  ``int()`` that could round it to zero;
- the ``rank_pattern``/``alpha_pattern`` key PEFT matches to one module and no other (:func:`pattern_key`);
- what a module is: its type and layer index (:func:`describe_module`) and its block, attention, MLP or
  other (:func:`module_block`), the one grouping every table and scalar uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import LoraMonitorError, check_number

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


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """``s`` for ``lora_alpha`` at ``rank``: ``α/√r`` with rsLoRA, ``α/r`` otherwise (PEFT's rule)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scale`` at ``rank`` (the inverse of :func:`lora_scale`)."""
    return scale * math.sqrt(rank) if use_rslora else scale * rank


def alpha_at_rank(alpha: float, old_rank: int, new_rank: int, use_rslora: bool) -> float:
    """The alpha that keeps the scale of ``alpha`` at ``old_rank`` when the rank becomes ``new_rank``."""
    ratio = new_rank / old_rank
    return alpha * (math.sqrt(ratio) if use_rslora else ratio)


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


def _config_rank(value: Any, key: str, where: str) -> int:
    return int(check_number(value, f"{where}: {key}", low=1, whole=True, hint="a LoRA rank"))


def _config_alpha(value: Any, key: str, where: str) -> float:
    return float(check_number(value, f"{where}: {key}", hint="lora_alpha, the scale's numerator"))


def _pattern(config: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    pattern = config.get(key)
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise LoraMonitorError(
            f"{where}: {key} must be a mapping of module patterns to values, got {type(pattern).__name__} "
            f"{pattern!r}"
        )
    # Every entry is checked, matched or not: a bad one would break PEFT's own loading of this adapter.
    check = _config_rank if key == "rank_pattern" else _config_alpha
    for pattern_name, value in pattern.items():
        check(value, f"{key}[{pattern_name!r}]", where)
    return dict(pattern)


def scale_for(
    config: Mapping[str, Any], name: str, rank: int | None = None, *, where: str = "adapter config"
) -> tuple[int, float, float]:
    """``(r, alpha, scale)`` of module ``name`` from an adapter config, as PEFT computes them.

    ``rank_pattern``/``alpha_pattern`` are matched as PEFT's ``get_pattern_key`` matches them; rsLoRA uses
    ``alpha/√r``. ``rank`` (from the stored weights) overrides the configured r where given. A value of
    the wrong type raises :class:`LoraMonitorError` naming ``where`` (the config file) and the key.
    """
    rank_pattern = _pattern(config, "rank_pattern", where)
    alpha_pattern = _pattern(config, "alpha_pattern", where)
    rank_key = pattern_key_for(list(rank_pattern), name)
    alpha_key = pattern_key_for(list(alpha_pattern), name)
    r_label = f"rank_pattern[{rank_key!r}]" if rank_key in rank_pattern else "r"
    alpha_label = f"alpha_pattern[{alpha_key!r}]" if alpha_key in alpha_pattern else "lora_alpha"
    # PEFT's LoraConfig defaults (r=8, lora_alpha=8) where a key is absent; a key present must be valid.
    r = _config_rank(rank_pattern.get(rank_key, config.get("r", 8)), r_label, where)
    alpha = _config_alpha(alpha_pattern.get(alpha_key, config.get("lora_alpha", 8)), alpha_label, where)
    if rank is not None:
        r = rank
    return int(r), float(alpha), float(lora_scale(alpha, r, bool(config.get("use_rslora"))))
