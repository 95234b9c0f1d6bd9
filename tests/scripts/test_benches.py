"""The benchmark scripts run to their tables at a tiny size (their figures are read by people, not asserted:
this only keeps a library change from breaking a bench unnoticed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from offline_run import run_offline

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.slow  # each bench runs in a child process


def run_bench(arguments: list[str], tmp_path: Path) -> str:
    command = [sys.executable, str(BENCH / arguments[0]), *arguments[1:]]
    return run_offline(command, tmp_path, timeout=300, environment={"BENCH_THREADS": "1", "COLUMNS": "200"})


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            [
                "spectrum.py",
                "--layers",
                "1",
                "--ranks",
                "8",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--dense",
                "off",
                "--device",
                "cpu",  # the accelerator rows' code path, on the CPU (a GPU session passes cuda)
            ],
            "on cpu: one monitor check",
        ),
        (
            ["squeeze.py", "--layers", "1", "--rank", "32", "--dense", "off"],
            "peak RSS over imports / adapter",
        ),
        (
            [
                *("monitor_overhead.py", "--steps", "8", "--warmup", "1", "--repeats", "1", "--hidden", "64"),
                *("--block", "2"),
            ],
            "Side by side in one run",  # printed after the table, from the alternating run's block pairs
        ),
    ],
    ids=["spectrum", "squeeze", "monitor_overhead"],
)
def test_bench_prints_its_table(arguments, expected, tmp_path):
    assert expected in run_bench(arguments, tmp_path)
