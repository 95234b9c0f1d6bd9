"""One process of a 2-process gloo DDP run with InSqueezeCallback: ``<init file> <output folder>``.

Writes ``process<rank>.json`` (what the callback did) and ``process<rank>.pt`` (the live factors and the
logits of a fixed input) into the output folder.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from tiny_models import peft_llama, training_args
from transformers import Trainer, TrainerCallback

from distributed_workers.group import process_group
from lora_monitor import find_lora_modules
from lora_monitor._distributed import broadcast_from_main
from lora_monitor.callbacks.in_squeeze import InSqueezeCallback
from lora_monitor.in_squeeze import unwrap_optimizer

PROBE_IDS = [[1, 5, 9, 12, 7, 30, 4, 2]]


class _Audit(TrainerCallback):
    """After every step: the nominal rank of the parameters, and whether the optimizer holds exactly them."""

    def __init__(self) -> None:
        self.nominal_shapes: set[int] = set()
        self.mismatches: list[int] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.nominal_shapes.add(find_lora_modules(model)[0].module.lora_A["default"].weight.shape[0])
        optimized = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
        if optimized != {id(p) for p in model.parameters() if p.requires_grad}:
            self.mismatches.append(state.global_step)


def main(init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    with process_group(init_file) as rank:
        torch.manual_seed(0)
        ids = torch.randint(3, 128, (32, 16)).tolist()
        data = Dataset.from_dict({"input_ids": ids, "labels": ids})
        squeeze, audit = InSqueezeCallback(target_rank=4, start_step=6, end_step=12), _Audit()
        args = training_args(out, max_steps=16, save_strategy="steps", save_steps=14, ddp_backend="gloo")
        model = peft_llama(r=16, lora_alpha=32, init_lora_weights=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[squeeze, audit])
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        live = trainer.model.eval()
        with torch.no_grad():
            logits = live(input_ids=torch.tensor(PROBE_IDS)).logits
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
            "nominal_shapes": sorted(audit.nominal_shapes),
            "mismatches": audit.mismatches,
            # Each process proposes its own targets; all must come back with rank 0's.
            "decision": broadcast_from_main({"model.layers.0.self_attn.q_proj": 4 + rank}),
        }
        with open(os.path.join(out, f"process{rank}.json"), "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
