"""The rule that scales a LoRA module, written once.

- the scale ``s`` of ``ΔW = s·B@A``: ``α/r``, or ``α/√r`` with rsLoRA (:func:`scale_for` reads it from a saved
  config exactly as PEFT applies ``rank_pattern``/``alpha_pattern``);
- the alpha that keeps a scale at another rank (:func:`alpha_for_scale`, :func:`alpha_at_rank`): never an
  ``int()`` that could round it to zero.

What a module is called (its type, layer, block and pattern key) is :mod:`.naming`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import LoraMonitorError, check_number
from . import naming
from .naming import pattern_key_for


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


# Names that lived here until 0.x and moved to .naming: still readable from here for a release, with a warning.
_MOVED_TO_NAMING = (
    "ATTENTION_TYPES",
    "BLOCKS",
    "MLP_TYPES",
    "describe_module",
    "module_block",
    "pattern_key",
    "pattern_key_for",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_NAMING:
        warnings.warn(
            f"lora_monitor.adapters.scaling.{name} moved to lora_monitor.adapters.naming.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(naming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
