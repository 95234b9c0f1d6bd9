"""Files: strict JSON, the one atomic writer, the names of the files lora-monitor reads and writes, and what
an input folder must hold (:func:`adapter_folder`, :func:`model_folder`).

Every file or folder lora-monitor writes goes through :func:`atomic_file` or :func:`staged_folder`: it is
built under a hidden staging name beside its target and renamed into place, so a reader (or a crash)
never sees half of it. A staging name left by a killed run is removed by the next run that writes the
same target. Any ``OSError`` (read-only folder, full disk) becomes a :class:`LoraMonitorError` naming the
path, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .errors import LoraMonitorError, check_path

# A PEFT adapter folder: its config and its weights (safetensors, or PyTorch's pickle format).
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# A model folder written by save_pretrained.
MODEL_CONFIG_NAME = "config.json"

# The files a run writes into the Trainer's output_dir.
MONITOR_FILE = "lora_monitor.jsonl"
MANIFEST_NAME = "manifest.json"
SQUEEZE_MANIFEST_NAME = "squeeze_manifest.json"
SQUEEZE_FILES = (SQUEEZE_MANIFEST_NAME, MANIFEST_NAME)
REPORT_NAME = "report.html"
EDIT_META_NAME = "spectral_edit_meta.json"


def adapter_folder(path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """The folder that holds the adapter's :data:`CONFIG_NAME`: ``path``, or its sub-folder ``adapter_name``
    (where PEFT saves an adapter that is not ``"default"``); else a :class:`LoraMonitorError` that says what
    is there instead (other adapters in sub-folders are named, with the option that picks one).

    It reads no file and imports nothing: ``load_adapter`` starts with it, and the command runs it before it
    imports torch, so a folder that is not an adapter is answered at once.
    """
    folder = check_path(path, "adapter folder", folder=True, hint=f"give the folder that holds {CONFIG_NAME}")
    if adapter_name is not None and adapter_name != "default":
        # An adapter name is one folder name (PEFT's sub-folder), never a path out of the adapter folder.
        if (
            not isinstance(adapter_name, str)
            or adapter_name in ("", ".", "..")
            or Path(adapter_name).name != adapter_name
        ):
            raise LoraMonitorError(
                f"{folder}: adapter name {adapter_name!r} is not the name of an adapter (PEFT saves an adapter named "
                f"foo in the sub-folder foo; adapters in sub-folders: {_nested_adapters(folder) or 'none'})"
            )
        if not (folder / adapter_name).is_dir():
            found = _nested_adapters(folder)
            raise LoraMonitorError(
                f"{folder}: no adapter named {adapter_name!r} (adapters in sub-folders: {found or 'none'})"
            )
        folder = folder / adapter_name
    if not (folder / CONFIG_NAME).is_file():
        raise LoraMonitorError(no_adapter_config_message(folder))
    return folder


def no_adapter_config_message(folder: Path) -> str:
    """Why ``folder`` is no adapter folder; PEFT saves an adapter named ``foo`` as ``folder/foo/``: say so."""
    nested = _nested_adapters(folder) if folder.is_dir() else []
    if not nested:
        return f"{folder}: no {CONFIG_NAME} here, so this is not a PEFT adapter folder"
    options = " or ".join(f"--adapter-name {name} (adapter_name={name!r})" for name in nested)
    return (
        f"{folder}: no {CONFIG_NAME} here, but PEFT saved adapter(s) {nested} in sub-folders: pass {options}, "
        f"or give {folder / nested[0]}"
    )


def _nested_adapters(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if (path / CONFIG_NAME).is_file())


def model_folder(path: str | os.PathLike, what: str = "model folder") -> Path:
    """``path`` when it is a folder holding :data:`MODEL_CONFIG_NAME` (a model saved with ``save_pretrained``),
    else a :class:`LoraMonitorError` naming it. Reads no file, imports nothing (see :func:`adapter_folder`)."""
    folder = check_path(path, what, folder=True, hint="expected a model saved with save_pretrained")
    if not (folder / MODEL_CONFIG_NAME).is_file():
        raise LoraMonitorError(
            f"{folder}: no {MODEL_CONFIG_NAME} (expected a model saved with save_pretrained)"
        )
    return folder


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively through dicts/lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _safe_item(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_safe_item(item) for item in value]
    return value


def _safe_item(item: Any) -> Any:
    # The common items answered without another call of json_safe: a monitor record is ~2,000 of them,
    # written at every check.
    if isinstance(item, str | int | None):
        return item
    if isinstance(item, float):
        return item if math.isfinite(item) else None
    return json_safe(item)


def plain_fields(instance: Any) -> dict[str, Any]:
    """A flat dataclass's fields as a dict: ``dataclasses.asdict`` without its deep copy, which costs ten
    times more and shows at a monitor check every step."""
    names, values = _field_names(type(instance)), vars(instance)
    if len(values) == len(names):  # only the fields, set by __init__ in their order: copied in one call
        return dict(values)
    return {name: getattr(instance, name) for name in names}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


def json_number(value: float) -> int | float:
    """A whole number as an int (as PEFT writes ``lora_alpha``), anything else as the exact float."""
    return int(value) if float(value).is_integer() else float(value)


def dumps(document: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text (non-finite numbers become null) ending in a newline; one line without spaces
    when ``indent`` is None (a JSONL line, written at every monitor check)."""
    if indent is None:
        # orjson writes non-finite floats as null itself and formats floats ~15× faster than the standard
        # library (a monitor line holds ~1,500 of them: 0.5 ms of every check at every_n_steps=1). A value
        # it does not take (an int beyond 64 bits, a custom type) goes the standard way below.
        options = _JSONL_OPTIONS | (orjson.OPT_SORT_KEYS if sort_keys else 0)
        with contextlib.suppress(TypeError):
            return orjson.dumps(document, option=options).decode()
    options = {"indent": indent, "sort_keys": sort_keys, "allow_nan": False}
    if indent is None:
        options["separators"] = (",", ":")
    try:  # most documents are clean already: one pass, not two
        text = json.dumps(document, **options)
    except ValueError:
        text = json.dumps(json_safe(document), **options)
    return text + "\n"


_JSONL_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def remove_stale_staging(target: Path) -> None:
    """Remove staging files/folders a killed run left beside ``target`` (they hold partial output)."""
    parent = target.parent
    if not parent.is_dir():
        return
    for leftover in parent.glob(f"{_staging_prefix(target)}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


def _unwritable(path: Path, error: OSError) -> LoraMonitorError:
    reason = error.strerror or str(error)
    return LoraMonitorError(f"{path}: cannot write here ({reason}); nothing was written")


@contextlib.contextmanager
def staged_folder(output: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``output`` (replacing it when ``replace``).

    On any error the staging folder is removed and ``output`` is as it was. ``OSError`` from the file
    system becomes a :class:`LoraMonitorError` naming ``output``.
    """
    staging = output.parent / f"{_staging_prefix(output)}{uuid.uuid4().hex[:8]}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output)
        staging.mkdir()
    except OSError as error:
        raise _unwritable(output, error) from error
    try:
        yield staging
        if output.exists() and replace:
            retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(retired)
            try:
                staging.rename(output)
            except BaseException:
                retired.rename(output)  # put the previous folder back where it was
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            if output.exists():
                output.rmdir()  # an empty folder (checked by the caller): replaced by the staged one
            staging.rename(output)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _unwritable(output, error) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` all at once: a reader sees the old file or the new one, never half."""
    staging = path.with_name(f"{_staging_prefix(path)}{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            staging.unlink()
        raise _unwritable(path, error) from error
    return path


def atomic_write_json(path: Path, document: Any) -> Path:
    """Strict JSON (:func:`dumps`) written with :func:`atomic_write_text`."""
    return atomic_write_text(path, dumps(document))


def read_text(path: Path) -> str:
    """The file's text; one :class:`LoraMonitorError` naming it when it is not UTF-8 text (a binary file)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraMonitorError(f"{path}: not a text file ({error.reason} at byte {error.start})") from error


def read_json_lines(
    path: Path, what: str = "a JSON object", required: str | None = None
) -> list[dict[str, Any]]:
    """Every line of a JSONL log, in order (blank lines skipped); one :class:`LoraMonitorError` naming the
    file and the line when the file is not UTF-8 text or a line is not ``what``: a JSON object (with the key
    ``required``)."""
    records = []
    for number, record in json_lines(read_text(path), path):
        if not isinstance(record, dict) or (required is not None and required not in record):
            raise LoraMonitorError(f"{path}: line {number} is not {what}")
        records.append(record)
    return records


def json_lines(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of JSONL ``text``; a line that is not JSON is a
    :class:`LoraMonitorError` naming ``path`` and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise LoraMonitorError(f"{path}: line {number} is not JSON ({error})") from error


def write_json_lines(path: Path, records: list[Any]) -> Path:
    """``records`` as a JSONL log, written all at once (:func:`atomic_write_text`): a log cut back to a
    resumed run's checkpoint is read whole or not at all."""
    return atomic_write_text(path, "".join(dumps(record, indent=None) for record in records))


def append_json_line(path: Path, record: Any) -> None:
    """Append one strict-JSON line to ``path`` (a log: appended, never rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(dumps(record, indent=None))
