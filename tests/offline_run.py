"""Running a script or command of this repository as a user would, offline, in a child process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def run_offline(
    command: list[str], cwd: Path, timeout: int = 600, environment: dict[str, str] | None = None
) -> str:
    """Run ``command`` in ``cwd`` with the Hub and W&B offline (plus ``environment``); its stdout, or a
    failed assertion showing the end of both streams."""
    result = subprocess.run(
        command,
        cwd=cwd,
        env={
            **os.environ,
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(environment or {}),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout
