"""InSqueezeCallback in a 2-process gloo DDP run on CPU: mask mode, identical adapters.

The worker is tests/distributed_workers/in_squeeze_ddp.py; the processes meet through a file, not a port.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_workers.launch import run_workers
from peft import PeftModel
from tiny_models import tiny_llama

from lora_monitor import load_adapter

pytestmark = pytest.mark.slow  # two processes that train


def test_two_process_ddp_run_masks_and_ends_with_identical_adapters(tmp_path):
    run_workers("in_squeeze_ddp", tmp_path, str(tmp_path))

    reports = [json.loads((tmp_path / f"process{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["mode"] == "mask"  # chosen by mode="auto" because the run is distributed
        assert report["events"] == [[6, [8]], [12, [4]]]
        assert report["nominal_shapes"] == [16]  # the DDP parameter set never changed
        assert report["mismatches"] == []
        assert report["decision"] == {"model.layers.0.self_attn.q_proj": 4}
    first, second = (torch.load(tmp_path / f"process{rank}.pt") for rank in (0, 1))
    assert first["factors"].keys() == second["factors"].keys()
    for key, tensor in first["factors"].items():
        assert torch.equal(tensor, second["factors"][key]), key
        if key.endswith("A"):
            assert tensor[4:].abs().max() == 0

    # The checkpoints (step 14 and the last step) and the final adapter all hold the reduced rank.
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-14", "checkpoint-16"]
    for folder in (*(tmp_path / name for name in checkpoints), tmp_path / "final"):
        assert {m.rank for m in load_adapter(folder)} == {4}
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "final").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([[1, 5, 9, 12, 7, 30, 4, 2]])).logits
    assert torch.allclose(logits, first["logits"], atol=1e-5)
