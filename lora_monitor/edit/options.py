"""The options of a spectral edit, checked without importing torch: :class:`EditConfig`, :func:`edit_config`
and :func:`check_batching`.

``lora-monitor edit`` checks every option here before it imports torch and transformers or loads a tokenizer
and a model (seconds, minutes for a real model): a wrong ``--core-frac`` is answered at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import LoraMonitorError, check_choice, check_number

MODES = ("abs_select", "random_index", "gd")
UPDATES = ("multiplicative", "additive")
# Which norm of σ an edit keeps (None: neither); the command's "none" is None.
PRESERVE_ENERGY = ("l1", "l2", None)


@dataclass(frozen=True)
class EditConfig:
    """The options of one edit, written into ``spectral_edit_meta.json``; checked when made (a
    :class:`LoraMonitorError` names the first option out of range). ``target_modules`` and ``layers`` may be
    given as any iterable (a single module name too) and are kept as tuples."""

    mode: str = "abs_select"
    target_modules: tuple[str, ...] = ("down_proj", "o_proj")
    layers: tuple[int, ...] | None = None
    core_frac: float = 0.2
    noise_frac: float = 0.2
    amp_factor: float = 1.25
    sup_factor: float = 0.8
    mid_factor: float = 1.0
    eta: float = 0.2
    update: str = "multiplicative"
    preserve_energy: str | None = "l1"
    seed: int = 0

    def __post_init__(self) -> None:
        # None is every module type, as an empty tuple is.
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules or (), "target_modules"))
        if self.layers is not None:
            object.__setattr__(self, "layers", _as_tuple(self.layers, "layers"))
        check_choice(self.mode, MODES, "mode")
        check_choice(self.update, UPDATES, "update")
        check_choice(self.preserve_energy, PRESERVE_ENERGY, "preserve_energy")
        for module_type in self.target_modules:
            if not isinstance(module_type, str):
                raise LoraMonitorError(
                    f"every target_modules entry must be a module name, got {module_type!r}"
                )
        for layer in self.layers or ():
            check_number(layer, "every layer of layers", low=0, whole=True)
        for name in ("core_frac", "noise_frac"):
            check_number(getattr(self, name), name, low=0, high=1)
        if self.core_frac + self.noise_frac > 1:
            raise LoraMonitorError(
                f"core_frac + noise_frac must be at most 1, got {self.core_frac + self.noise_frac}"
            )
        for name in ("amp_factor", "sup_factor", "mid_factor"):
            check_number(getattr(self, name), name, low=0)
        check_number(self.eta, "eta")
        check_number(self.seed, "seed", whole=True)

    def validate(self) -> None:
        """Deprecated, does nothing: an :class:`EditConfig` is checked when it is made."""
        warnings.warn(
            "EditConfig.validate() is deprecated: an EditConfig is checked when it is made",
            DeprecationWarning,
            stacklevel=2,
        )


def edit_config(**options: Any) -> EditConfig:
    """The :class:`EditConfig` of ``options`` (its fields by name), validated; an unknown name is refused."""
    unknown = set(options) - set(EditConfig.__dataclass_fields__)
    if unknown:
        raise LoraMonitorError(f"unknown spectral_edit options {sorted(unknown)}")
    return EditConfig(**options)


def _as_tuple(values: Iterable[Any] | str, option: str) -> tuple[Any, ...]:
    if isinstance(values, str):
        return (values,)
    try:
        return tuple(values)
    except TypeError:
        raise LoraMonitorError(f"{option} must be a list, got {values!r}") from None


def check_batching(batch_size: int, max_length: int, max_samples: int | None) -> None:
    """A :class:`LoraMonitorError` naming the first of the calibration batching options out of range:
    ``batch_size`` and ``max_length`` (tokens per text) at least 1, ``max_samples`` a whole number (0 or None:
    every text)."""
    check_number(batch_size, "batch_size", low=1, whole=True)
    check_number(max_length, "max_length", low=1, whole=True)
    if max_samples is not None:
        check_number(max_samples, "max_samples", low=0, whole=True, hint="0 = every text")


__all__ = ["MODES", "EditConfig", "check_batching", "edit_config"]
