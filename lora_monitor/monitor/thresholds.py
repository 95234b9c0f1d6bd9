"""How urgent an alert is (:class:`Severity`) and the thresholds of every rule (:class:`AlertThresholds`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from ..errors import LoraMonitorError, check_number


class Severity(str, Enum):
    """How urgent an alert is."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class AlertThresholds:
    """Thresholds of every rule (defaults from the LoRA research agenda).

    Checked when made: every threshold is a number (the step and check counts whole numbers) in its range,
    and ``dominance_warning ≤ dominance_critical``, ``update_scale_low ≤ update_scale_high``; anything
    else raises :class:`~lora_monitor.errors.LoraMonitorError` naming the threshold and its value. An
    upper limit may be ``inf`` to switch its rule off.
    """

    low_rank_fraction: float = 0.25
    max_condition_number: float = 1000.0
    early_collapse_drop: float = 0.5
    early_collapse_steps: int = 100
    saturation_checks: int = 5
    saturation_tolerance: float = 0.02
    dominance_warning: float = 0.3
    dominance_critical: float = 0.5
    update_scale_high: float = 1.0
    update_scale_low: float = 1e-4
    update_scale_low_after_steps: int = 100
    dead_adapter_steps: int = 20

    def __post_init__(self) -> None:
        for name, allowed in _THRESHOLD_RANGES.items():
            value = getattr(self, name)
            check_number(value, f"alert threshold {name}", **allowed)
            if allowed.get("whole") and not isinstance(value, int):
                # check_number takes 3.0 as whole; a count given as a float is a typo in a config.
                raise LoraMonitorError(f"alert threshold {name} must be a whole number, got {value!r}")
        for lower, upper in (
            ("dominance_warning", "dominance_critical"),
            ("update_scale_low", "update_scale_high"),
        ):
            if getattr(self, lower) > getattr(self, upper):
                raise LoraMonitorError(
                    f"alert threshold {lower}={getattr(self, lower)!r} must not exceed "
                    f"{upper}={getattr(self, upper)!r}"
                )

    @classmethod
    def from_value(cls, value: AlertThresholds | Mapping[str, Any] | None) -> AlertThresholds:
        """Thresholds from None (defaults), an :class:`AlertThresholds`, or a dict of overrides."""
        if value is None:
            return cls()
        if isinstance(value, AlertThresholds):
            return value
        if not isinstance(value, Mapping):
            raise LoraMonitorError(
                f"alert thresholds must be an AlertThresholds or a dict of overrides, got {value!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(value) - known)
        if unknown:
            raise LoraMonitorError(
                f"unknown alert threshold(s) {unknown}; the thresholds are {sorted(known)}"
            )
        return replace(cls(), **dict(value))


_OPEN_ABOVE_ZERO = dict(low=0.0, low_open=True, infinite_ok=True)
# check_number's arguments per threshold. An upper limit may be inf (its rule off).
_THRESHOLD_RANGES: dict[str, dict[str, Any]] = {
    "low_rank_fraction": dict(low=0.0, high=1.0),  # rank utilization is at most 1; 0 switches the rule off
    "max_condition_number": dict(low=1.0, infinite_ok=True),  # κ is at least 1
    "early_collapse_drop": dict(low=0.0, high=1.0, low_open=True),  # a fraction of the peak
    "early_collapse_steps": dict(low=0, whole=True),
    "saturation_checks": dict(low=2, whole=True),  # one check alone is trivially unchanged
    "saturation_tolerance": dict(low=0.0),  # 0: exactly unchanged
    "dominance_warning": _OPEN_ABOVE_ZERO,
    "dominance_critical": _OPEN_ABOVE_ZERO,
    "update_scale_high": _OPEN_ABOVE_ZERO,
    "update_scale_low": dict(low=0.0),  # 0 switches the rule off
    "update_scale_low_after_steps": dict(low=0, whole=True),
    "dead_adapter_steps": dict(low=1, whole=True),
}
