"""InSqueezeCallback in a 2-process gloo DDP run (torchrun on CPU): mask mode, identical adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import tiny_llama
from peft import PeftModel

from lora_monitor import load_adapter

TESTS_DIR = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from conftest import peft_llama, training_args
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback
    from lora_monitor import find_lora_modules
    from lora_monitor.callbacks.in_squeeze import InSqueezeCallback
    from lora_monitor.in_squeeze.resize import _same_decision_everywhere, unwrap_optimizer

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (32, 16)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    nominal_shapes, mismatches = set(), []

    class Audit(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            nominal_shapes.add(find_lora_modules(model)[0].module.lora_A["default"].weight.shape[0])
            optimized = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
            if optimized != {id(p) for p in model.parameters() if p.requires_grad}:
                mismatches.append(state.global_step)

    squeeze = InSqueezeCallback(target_rank=4, start_step=6, end_step=12)
    args = training_args(out, max_steps=16, save_strategy="steps", save_steps=14, ddp_backend="gloo")
    model = peft_llama(r=16, lora_alpha=32, init_lora_weights=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[squeeze, Audit()])
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    live = trainer.model
    live.eval()
    with torch.no_grad():
        logits = live(input_ids=torch.tensor([[1, 5, 9, 12, 7, 30, 4, 2]])).logits
    factors = {  # the parameters themselves: records show only the kept directions of a masked module
        r.name + side: getattr(r.module, "lora_" + side)["default"].weight.detach().clone()
        for r in find_lora_modules(live)
        for side in "AB"
    }
    torch.save({"factors": factors, "logits": logits}, os.path.join(out, f"process{rank}.pt"))
    report = {
        "mode": squeeze.resolved_mode,
        "world_size": args.world_size,
        "events": [(e["step"], sorted(set(e["ranks"].values()))) for e in squeeze.events],
        "nominal_shapes": sorted(nominal_shapes),
        "mismatches": mismatches,
        # Each process proposes its own targets; all must come back with rank 0's.
        "decision": _same_decision_everywhere({"model.layers.0.self_attn.q_proj": 4 + rank}),
    }
    with open(os.path.join(out, f"process{rank}.json"), "w") as handle:
        json.dump(report, handle)
    """
)


def test_two_process_ddp_run_masks_and_ends_with_identical_adapters(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), str(tmp_path), str(TESTS_DIR)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

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
