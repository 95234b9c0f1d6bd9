"""Reading back a finished offline W&B run (``WANDB_MODE=offline``): its records, summary and history keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def run_with_offline_wandb(monkeypatch, folder: Path, train: Callable[[], object]) -> Path:
    """Call ``train`` (a run that reports to W&B) with W&B offline under ``folder``; the finished run's folder.

    Skips the test where wandb is not installed.
    """
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_PROJECT", "lora-monitor-tests")
    try:
        train()
        # The run's own folder: W&B keeps its first settings per process, so WANDB_DIR may not apply.
        return Path(wandb.run.dir).parent
    finally:
        wandb.finish()


def offline_wandb_records(run_dir, timeout: float = 120.0) -> list:
    """The records of a finished offline W&B run (``run-*.wandb``), parsed with W&B's own protobufs.

    The log is W&B's LevelDB-style record file: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    wandb-core may still be flushing it when ``wandb.finish()`` returns, so the records are read once the
    run's exit record is in the file (never a fixed sleep; a run that has no exit record within ``timeout``
    fails the test with what was found).
    """
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        records = [wandb_internal_pb2.Record.FromString(raw) for raw in _wandb_log_records(Path(run_dir))]
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, (
            f"{run_dir}: no exit record after {timeout} s ({len(records)} records)"
        )
        time.sleep(0.2)


def offline_wandb_summary(run_dir) -> dict:
    """The summary of a finished offline W&B run: ``files/wandb-summary.json`` where the client wrote one,
    else the summary records of its log (wandb 0.31 writes the json only when syncing)."""
    import json

    summary_file = Path(run_dir) / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    summary = {}
    for record in offline_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def offline_wandb_history_keys(run_dir) -> set[str]:
    """Every key logged to the history of a finished offline W&B run."""
    keys = set()
    for record in offline_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def _wandb_log_records(run_dir) -> list[bytes]:
    import struct

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of a block
            position += left
            continue
        if position + 7 + length > len(data):  # a record still being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records
