"""Numbers in JSON: strict JSON has no NaN or infinity, and a whole alpha reads best as an int."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively through dicts/lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def json_number(value: float) -> int | float:
    """A whole number as an int (as PEFT writes ``lora_alpha``), anything else as the exact float."""
    return int(value) if float(value).is_integer() else float(value)
