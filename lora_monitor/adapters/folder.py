"""Writing a PEFT adapter folder: the config at new ranks (patterns PEFT matches, exact alphas) and the files.

A folder written here is an ordinary PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``
(+ any extra files of the source), loaded by ``PeftModel.from_pretrained``. It is built under a staging
name and moved into place (:func:`lora_monitor._io.staged_folder`); the input folder is never written.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._io import dumps, json_number, staged_folder
from ..errors import LoraMonitorError
from .naming import pattern_key
from .record import LoraModule
from .saved import CONFIG_NAME, SAFETENSORS_NAME
from .scaling import alpha_for_scale


def lora_config_for_ranks(
    config: Mapping[str, Any], modules: Sequence[LoraModule], ranks: Mapping[str, int]
) -> dict[str, Any]:
    """``config`` rewritten so that each module gets rank ``ranks[name]`` with its scale unchanged.

    The commonest (rank, alpha) pair becomes ``r``/``lora_alpha``; every other module gets an anchored
    ``rank_pattern``/``alpha_pattern`` entry. Alphas are exact (``α·k/r``, ``α·√(k/r)`` with rsLoRA).
    """
    targets: dict[str, tuple[int, float]] = {}
    for module in modules:
        rank = ranks[module.name]
        # an unchanged module keeps its configured alpha as written, bit for bit
        targets[module.name] = (
            rank,
            module.alpha if rank == module.rank else alpha_for_scale(module.scale, rank, module.use_rslora),
        )
    return {**config, **rank_fields(targets)}


def rank_fields(targets: Mapping[str, tuple[int, float]]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern`` of a LoRA config that gives each module
    (by path) its ``(rank, alpha)`` in ``targets``, and names as few modules as it can.

    The commonest pair (the larger rank on a tie) becomes ``r``/``lora_alpha``: an adapter whose modules all
    share a rank says so in ``r``, with empty patterns. Every other module gets an anchored key
    (:func:`~lora_monitor.adapters.pattern_key`) in the pattern(s) where it differs. ``targets`` must name
    every LoRA module of the adapter: the patterns of the config it replaces are dropped.
    """
    counts = Counter(targets.values())
    default_rank, default_alpha = max(counts, key=lambda pair: (counts[pair], pair[0]))
    return {
        "r": default_rank,
        "lora_alpha": json_number(default_alpha),
        "rank_pattern": {
            pattern_key(name): rank for name, (rank, _) in targets.items() if rank != default_rank
        },
        "alpha_pattern": {
            pattern_key(name): json_number(alpha)
            for name, (_, alpha) in targets.items()
            if alpha != default_alpha
        },
    }


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: Path, source_folder: Path | None, overwrite: bool) -> None:
    """Refuse an output that is the input, inside it or around it, or a non-empty folder without ``overwrite``."""
    resolved = output.resolve()
    if source_folder is not None:
        source = source_folder.resolve()
        if _is_within(resolved, source):
            raise LoraMonitorError(
                f"{output}: is the input adapter folder {source_folder} or inside it; "
                "write the compressed adapter somewhere else (the input is never overwritten)"
            )
        if _is_within(source, resolved):
            raise LoraMonitorError(
                f"{output}: contains the input adapter folder {source_folder}; replacing it would delete "
                "the input"
            )
    if output.exists():
        if not output.is_dir():
            raise LoraMonitorError(f"{output}: exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise LoraMonitorError(f"{output}: exists and is not empty; pass overwrite=True (--overwrite)")


def write_adapter_folder(
    output_path: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    extra_files: Iterable[Path] = (),
    source_folder: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (and ``extra_files``) as a folder.

    All or nothing: the folder is built under a staging name and renamed into place, so a failure
    (including a full disk or a read-only parent, reported as :class:`LoraMonitorError`) leaves no partial
    ``output_path``. ``output_path`` may not be ``source_folder`` or lie inside it; an existing non-empty
    folder is replaced only with ``overwrite=True``.
    """
    output = Path(output_path)
    check_output(output, source_folder, overwrite)
    with staged_folder(output, replace=overwrite) as staging:
        (staging / CONFIG_NAME).write_text(dumps(dict(config), sort_keys=True))
        seen: set[int] = set()
        contiguous = {}
        for key, tensor in tensors.items():
            tensor = tensor.detach().cpu().contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:  # safetensors refuses tensors that share memory (tied weights)
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            contiguous[key] = tensor
        try:
            save_file(contiguous, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
        except Exception as error:  # safetensors reports a full disk as its own SafetensorError
            raise LoraMonitorError(
                f"{output}: cannot write {SAFETENSORS_NAME} ({error}); nothing was written"
            ) from error
        for extra in extra_files:
            shutil.copy2(extra, staging / Path(extra).name)
    return output
