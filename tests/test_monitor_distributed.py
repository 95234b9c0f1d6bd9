"""Two CPU processes (gloo) split the per-module work and get the metrics one process gets."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import peft_llama, training_args

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset():
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 120, (16, 12), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": input_ids, "labels": input_ids})


def _worker(rank: int, port: int, output_dir: str, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    from transformers import Trainer

    from lora_monitor.adapters import find_lora_modules
    from lora_monitor.callbacks.monitor import SpectralMonitorCallback
    from lora_monitor.monitor.metrics import BaseNormCache, compute_module_metrics

    monitor = SpectralMonitorCallback(every_n_steps=1)
    trainer = Trainer(
        model=peft_llama(init_lora_weights=True),
        args=training_args(output_dir, max_steps=2, per_device_train_batch_size=2, ddp_backend="gloo"),
        train_dataset=_dataset(),
        callbacks=[monitor],
    )
    trainer.train()
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == WORLD_SIZE
    # The reference: this process measures every module itself, as a single process would.
    reference = compute_module_metrics(find_lora_modules(trainer.model), BaseNormCache())
    result = {
        "local_module_count": monitor.local_module_count,
        "latest": [m.to_dict(json_safe=True) for m in monitor.latest],
        "reference": [m.to_dict(json_safe=True) for m in reference],
        "log_history": [e for e in trainer.state.log_history if "lora/num_modules" in e],
        "alerts": [a.to_dict() for a in monitor.alerts],
    }
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def test_two_processes_match_one(tmp_path):
    output_dir, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(output_dir), str(result_dir)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]

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
