"""One process of a 2-process gloo run with SpectralMonitorCallback: ``<init file> <run folder> <results>``.

Writes ``rank<rank>.json``: the metrics the callback gathered, this process's own measurement of every
module (the single-process reference), the logged records and the alerts.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from tiny_models import peft_llama, training_args
from transformers import Trainer

from distributed_workers.group import process_group
from lora_monitor.adapters import find_lora_modules
from lora_monitor.callbacks.monitor import SpectralMonitorCallback
from lora_monitor.monitor.metrics import BaseNormCache, compute_module_metrics


def _dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 120, (16, 12), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": input_ids, "labels": input_ids})


def main(init_file: str, output_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    with process_group(init_file) as rank:
        monitor = SpectralMonitorCallback(every_n_steps=1)
        trainer = Trainer(
            model=peft_llama(init_lora_weights=True),
            args=training_args(output_dir, max_steps=2, per_device_train_batch_size=2, ddp_backend="gloo"),
            train_dataset=_dataset(),
            callbacks=[monitor],
        )
        trainer.train()
        # The reference: this process measures every module itself, as a single process would.
        reference = compute_module_metrics(find_lora_modules(trainer.model), BaseNormCache())
        result = {
            "world_size": torch.distributed.get_world_size(),
            "trainer_world_size": trainer.args.world_size,
            "local_module_count": monitor.local_module_count,
            "latest": [m.to_dict(json_safe=True) for m in monitor.latest],
            "reference": [m.to_dict(json_safe=True) for m in reference],
            "log_history": [e for e in trainer.state.log_history if "lora/num_modules" in e],
            "alerts": [a.to_dict() for a in monitor.alerts],
        }
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
