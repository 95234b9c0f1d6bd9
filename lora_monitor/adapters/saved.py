"""Adapter folders written by ``save_pretrained``: the config, checked, and the factors, read lazily.

:func:`load_adapter` gives a :class:`SavedAdapter`, whose :class:`~.record.LoraModule` records read each
factor from disk when it is used; the scale of each follows the config exactly as PEFT applies it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .._io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, adapter_folder, no_adapter_config_message
from ..errors import LoraMonitorError
from .factors import MAGNITUDE_SUFFIX, SAVED_A_SUFFIXES, strip_prefix
from .naming import describe_module
from .record import LoraModule
from .scaling import scale_for


@dataclass
class SavedAdapter:
    """An adapter folder written by ``save_pretrained``, read lazily (one tensor at a time)."""

    path: Path
    config: dict[str, Any]
    weights_file: Path
    keys: list[str]
    modules: list[LoraModule]

    reader: TensorReader

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, in its stored dtype."""
        return self.reader.tensor(key)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


class TensorReader:
    """Reads one stored tensor at a time from an adapter's weights file, through one open handle.

    Opening a safetensors file parses its whole header (0.25 ms for the 448 keys of a 7B-shaped adapter),
    which cost more than the reads themselves when every factor opened the file again. The handle is
    opened again after every ``reopen_bytes`` read, so the pages its mapping keeps resident stay bounded.
    """

    def __init__(self, weights_file: Path, reopen_bytes: int = 256 * 2**20):
        self.weights_file = weights_file
        self.reopen_bytes = reopen_bytes
        self._handle: Any = None
        self._read_since_open = 0

    def tensor(self, key: str) -> torch.Tensor:
        try:
            if self.weights_file.suffix != ".safetensors":
                return _load_bin(self.weights_file)[key]
            if self._handle is None or self._read_since_open >= self.reopen_bytes:
                self._handle = safe_open(str(self.weights_file), framework="pt")
                self._read_since_open = 0
            tensor = self._handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, KeyError) as error:
            raise LoraMonitorError(f"{self.weights_file}: cannot read tensor {key!r} ({error})") from error
        self._read_since_open += tensor.numel() * tensor.element_size()
        return tensor


_BIN_CACHE: dict[Path, tuple[float, dict[str, torch.Tensor]]] = {}


def _load_bin(weights_file: Path) -> dict[str, torch.Tensor]:
    # A pickle cannot be read lazily: the last one read is kept (and read again if the file changed).
    stamp = weights_file.stat().st_mtime
    cached = _BIN_CACHE.get(weights_file)
    if cached is None or cached[0] != stamp:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip and runtime errors for a damaged file
            raise LoraMonitorError(
                f"{weights_file}: not a readable PyTorch weights file ({error})"
            ) from error
        if not isinstance(state, dict):
            raise LoraMonitorError(f"{weights_file}: holds a {type(state).__name__}, not a state dict")
        _BIN_CACHE.clear()
        _BIN_CACHE[weights_file] = (stamp, state)
    return _BIN_CACHE[weights_file][1]


def _stored_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    try:
        if weights_file.suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        return {key: tuple(value.shape) for key, value in _load_bin(weights_file).items()}
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        raise LoraMonitorError(f"{weights_file}: not a readable adapter weights file ({error})") from error


def _check_target_modules(config: dict[str, Any], config_file: Path, modules: list[LoraModule]) -> None:
    """Refuse a config whose ``target_modules`` would not put every stored pair back where it was.

    Without ``target_modules`` PEFT falls back to its defaults for the architecture (``q_proj``/``v_proj``
    for Llama), so ``from_pretrained`` would load only some of the stored pairs and silently drop the rest;
    a compressed copy would inherit the defect.
    """
    stored_types = sorted({module.module_type for module in modules})
    target = config.get("target_modules")
    if target is None or target == [] or target == "":
        raise LoraMonitorError(
            f"{config_file}: target_modules is missing, so PEFT would apply this adapter only to its default "
            f'modules for the architecture; add "target_modules": {json.dumps(stored_types)} (the stored '
            "module types)"
        )
    if isinstance(target, str):
        uncovered = [m.name for m in modules if not re.fullmatch(target, m.name)]
    elif isinstance(target, list) and all(isinstance(item, str) for item in target):
        # PEFT's rule for a list: the module path is the name itself or ends with "." + name.
        uncovered = [
            m.name for m in modules if not any(m.name == t or m.name.endswith("." + t) for t in target)
        ]
    else:
        raise LoraMonitorError(
            f"{config_file}: target_modules must be a list of module names or a regex string, got {target!r}"
        )
    if uncovered:
        shown = ", ".join(uncovered[:3]) + (" ..." if len(uncovered) > 3 else "")
        raise LoraMonitorError(
            f"{config_file}: target_modules {target!r} does not cover {len(uncovered)} stored module(s) "
            f"({shown}); PEFT would not load them. Stored module types: {stored_types}"
        )


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json`` as a dict, checked to be a LoRA config."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoraMonitorError(no_adapter_config_message(folder))
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoraMonitorError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise LoraMonitorError(f"{config_file}: holds a JSON {type(config).__name__}, not an adapter config")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraMonitorError(f"{config_file}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")
    return config


def load_adapter(path: str | Path, adapter_name: str | None = None) -> SavedAdapter:
    """Read an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    Only the header is read now; each factor is read when a record's ``A``/``B`` is used. A folder saved
    from a model with several adapters keeps the non-default ones in sub-folders: name one with
    ``adapter_name``. Scales follow the config's ``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern`` and ``use_rslora`` exactly as PEFT applies them.
    """
    folder = adapter_folder(path, adapter_name)
    config = read_adapter_config(folder)
    weights_file = folder / SAFETENSORS_NAME
    if not weights_file.is_file():
        weights_file = folder / BIN_NAME
    if not weights_file.is_file():
        raise LoraMonitorError(f"{folder}: neither {SAFETENSORS_NAME} nor {BIN_NAME} is here")
    shapes = _stored_shapes(weights_file)
    reader = TensorReader(weights_file)
    modules = []
    for key, shape in shapes.items():
        kind = next((k for suffix, k in SAVED_A_SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is None:
            continue
        suffix = next(s for s in SAVED_A_SUFFIXES if key.endswith(s))
        prefix = key[: -len(suffix)]
        b_key = prefix + suffix.replace("_A", "_B")
        if b_key not in shapes:
            raise LoraMonitorError(f"{weights_file}: {key} has no matching {b_key}")
        b_shape = shapes[b_key]
        # A is r × n (r × in × kernel for a conv), B is m × r (out × r × 1… for a conv): the same number of
        # dimensions, at least two, none empty; anything else is no LoRA pair PEFT wrote.
        if len(shape) < 2 or len(b_shape) != len(shape) or 0 in shape or 0 in b_shape:
            raise LoraMonitorError(
                f"{weights_file}: {prefix} has A of shape {list(shape)} and B of shape {list(b_shape)}: not "
                "a LoRA pair (A is r × n and B is m × r, both non-empty; a conv's with kernel dimensions)"
            )
        rank = shape[0]
        if len(shape) > 2:
            kind = "conv"
        if b_shape[1] != rank:
            raise LoraMonitorError(
                f"{weights_file}: {prefix} has A of shape {list(shape)} and B of shape {list(b_shape)}: "
                f"their ranks differ"
            )
        name = strip_prefix(prefix)
        configured_rank, alpha, scale = scale_for(config, name, where=str(folder / CONFIG_NAME))
        if configured_rank != rank:
            raise LoraMonitorError(
                f"{folder}: module {name} has rank {rank} in its weights but {configured_rank} in "
                f"{CONFIG_NAME} (r / rank_pattern); the config and the weights do not belong together"
            )
        module_type, layer_index = describe_module(name)
        keys = {"A": key, "B": b_key}
        if prefix + MAGNITUDE_SUFFIX in shapes:
            keys["magnitude"] = prefix + MAGNITUDE_SUFFIX
        modules.append(
            LoraModule(
                name=name,
                module_type=module_type,
                layer_index=layer_index,
                kind=kind,
                rank=rank,
                alpha=alpha,
                scale=scale,
                use_rslora=bool(config.get("use_rslora")),
                use_dora=bool(config.get("use_dora")) and "magnitude" in keys,
                adapter_name=adapter_name or "default",
                A_shape=shape,
                B_shape=b_shape,
                load_A=partial(reader.tensor, key),
                load_B=partial(reader.tensor, b_key),
                keys=keys,
            )
        )
    if not modules:
        raise LoraMonitorError(f"{weights_file}: holds no LoRA factors (no *.lora_A.weight keys)")
    _check_target_modules(config, folder / CONFIG_NAME, modules)
    modules.sort(key=lambda m: _natural_key(m.name))
    return SavedAdapter(folder, config, weights_file, list(shapes), modules, reader)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
