"""Two CPU processes (gloo) split the per-module work and get the metrics one process gets.

The worker is tests/distributed_workers/monitor_ddp.py; the processes meet through a file, not a port.
"""

from __future__ import annotations

import json

import pytest
from distributed_workers.launch import run_workers

WORLD_SIZE = 2
pytestmark = pytest.mark.slow  # two processes each


def test_two_processes_match_one(tmp_path):
    output_dir, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    run_workers("monitor_ddp", tmp_path, str(output_dir), str(result_dir), world_size=WORLD_SIZE)
    results = [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]

    # Both the process group and the Trainer saw two processes.
    assert [(r["world_size"], r["trainer_world_size"]) for r in results] == [(2, 2), (2, 2)]
    # The work was split: each process measured half of the 14 modules, then everyone got all of them.
    assert [r["local_module_count"] for r in results] == [7, 7]
    for result in results:
        assert len(result["latest"]) == 14
        for gathered, reference in zip(result["latest"], result["reference"], strict=True):
            assert gathered["name"] == reference["name"]
            for key, value in reference.items():
                if key == "gradient_effective_rank":
                    assert gathered[key] is not None and gathered[key] > 0  # measured on both processes
                elif isinstance(value, float):
                    assert gathered[key] == pytest.approx(value, rel=1e-9), (reference["name"], key)
                else:
                    assert gathered[key] == value
    assert results[0]["latest"] == results[1]["latest"]
    assert results[0]["log_history"] == results[1]["log_history"]
    assert [e["step"] for e in results[0]["log_history"]] == [0, 1, 2]
    assert results[0]["alerts"] == results[1]["alerts"]

    # Only the main process wrote the JSONL file: one line per check, not two.
    lines = (output_dir / "lora_monitor.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_a_failing_worker_fails_the_test_with_every_workers_output(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        run_workers("failing", tmp_path)
    message = str(failure.value)
    # Rank 1 exits 1; rank 0 fails at the closing barrier or is stopped: either way not 0, not a timeout.
    assert "timed out" not in message and "--- worker 1 (exit 1) ---" in message
    assert "--- worker 0 (exit 0) ---" not in message
    assert "RuntimeError: rank 1 fails on purpose" in message
    assert "rank 0 sees 2 processes" in message and "rank 1 sees 2 processes" in message
