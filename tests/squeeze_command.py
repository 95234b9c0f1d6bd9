"""``lora-monitor squeeze`` run in this process, as the command's tests and the bad-input tests call it."""

from __future__ import annotations

from lora_monitor.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``lora-monitor squeeze *argv`` (each made a string): its exit status, stdout and stderr."""
    status = main(["squeeze", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err
