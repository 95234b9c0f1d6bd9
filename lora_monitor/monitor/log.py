"""The monitor's JSONL log read back: what a resumed run takes its history and alerts from.

``SpectralMonitorCallback`` writes one :meth:`~.check.MonitorRecord.to_dict` line per check. A run resumed
from a checkpoint replays the lines up to the checkpoint's step into its :class:`~.check.Monitor`, so that
its later checks see the trends and raise the alerts of the run that was never stopped, and cuts the file
back to them (the stopped run may have checked past its checkpoint). A line the stop cut short, and the lines
of an earlier run that an older version appended before this run's, are left out. No check is recorded at
the resume step; the restored adapter is judged there (:meth:`~.check.Monitor.verify_restored`). Without the
log (``jsonl_name=None``, another ``output_dir``) the trends and alerts start over, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import json_lines, read_text, write_json_lines
from ..errors import LoraMonitorError
from .check import Monitor


def read_monitor_log(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The checks of this run in the monitor's JSONL log, and whether the file held nothing else. A last line
    cut short (the run was killed while writing it) is left out, and so are the lines of an earlier run that
    an older version appended to (the steps start over where this run's begin)."""
    lines = read_text(path).splitlines()
    last = next((index for index in range(len(lines) - 1, -1, -1) if lines[index].strip()), None)
    whole = True
    if last is not None:
        try:
            json.loads(lines[last])
        except json.JSONDecodeError:
            lines, whole = lines[:last], False
    records: list[dict[str, Any]] = []
    for number, record in json_lines("\n".join(lines), path):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise LoraMonitorError(
                f"{path}: line {number} is not a monitor record (a JSON object with a step)"
            )
        if records and record["step"] <= records[-1]["step"]:
            records, whole = [], False
        records.append(record)
    return records, whole


def resume_from_log(monitor: Monitor, path: Path, step: int, *, rewrite: bool) -> int:
    """Replay into ``monitor`` the checks of the log at ``path`` up to ``step`` (:meth:`Monitor.replay`) and,
    with ``rewrite`` (the process that writes the log), cut the file back to them when it held more: checks
    past the checkpoint, a torn line, an earlier run's lines. Returns how many checks were replayed; a line
    that is not a monitor record is a :class:`LoraMonitorError` naming the file."""
    records, whole = read_monitor_log(path)
    kept = [record for record in records if record["step"] <= step]
    replayed = monitor.replay(kept)
    if rewrite and (len(kept) < len(records) or not whole):
        write_json_lines(path, kept)
    return replayed
