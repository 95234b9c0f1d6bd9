"""One process of a 2-process gloo run of a tiny PEFT Llama under torch FSDP2 (``fully_shard``), in a plain
training loop: ``<init file> <output folder>``.

Accelerate 1.15 turns FSDP on only for accelerators (on the CPU its Trainer silently runs DDP), so the
library's core is driven here directly, the way Accelerate's FSDP2 plugin wraps a model: every decoder
layer and the root get ``fully_shard``, and every LoRA factor becomes a DTensor shard.

Writes into the output folder:
- ``trained.pt`` (main process): the whole model state after training, and before its last step with the
  (averaged) gradients of that step, gathered;
- ``monitor<rank>.json``: the metrics of ``Monitor.check`` in this process;
- ``squeezed/`` (main process, by ``PostSqueezeCallback``): the trained adapter compressed;
- ``masked<rank>.pt``: after an In-Squeeze (mask mode) and more steps, the whole LoRA factors, the Adam
  moments of the factors, and the logits of a fixed input;
- ``final/`` (main process): the adapter saved after the squeeze, as Accelerate saves a full state dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tiny_models import peft_llama
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import TrainerControl, TrainerState, TrainingArguments

from distributed_workers.group import process_group
from lora_monitor.adapters import write_whole
from lora_monitor.callbacks.post_squeeze import PostSqueezeCallback
from lora_monitor.errors import LoraMonitorError
from lora_monitor.in_squeeze import squeeze_model
from lora_monitor.monitor import Monitor

PROBE_IDS = [[1, 5, 9, 12, 7, 30, 4, 2]]
TRAIN_STEPS = 3
STEPS_AFTER_SQUEEZE = 2
SQUEEZED_RANK = 4


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int, seed: int
) -> None:
    """``steps`` AdamW steps, each process on its own batch (as a data-parallel run does)."""
    model.train()
    for step in range(steps):
        generator = torch.Generator().manual_seed(seed + 10 * step + rank)
        ids = torch.randint(4, 120, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _gradient_mask_check(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> dict[str, float]:
    """The gradient mask on a shard: with a dropped row of A made non-zero for one backward pass, the dropped
    columns of B would get a gradient; the mask must zero it. A is put back afterwards."""
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    whole_A = _whole(A.detach()).clone()
    whole_A[SQUEEZED_RANK:] = 1.0
    write_whole(A, whole_A)
    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(500 + rank))
    model(input_ids=ids, labels=ids).loss.backward()
    grad_B = _whole(B.grad)
    found = {
        "dropped": float(grad_B[:, SQUEEZED_RANK:].abs().max()),
        "kept": float(grad_B[:, :SQUEEZED_RANK].abs().max()),
    }
    optimizer.zero_grad()
    whole_A[SQUEEZED_RANK:] = 0.0
    write_whole(A, whole_A)
    return found


def main(init_file: str, out: Path) -> None:
    with process_group(init_file) as rank:
        model = peft_llama(seed=0)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(
            model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight, DTensor
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

        # (a) the monitor, with gradients recorded before the last step
        monitor = Monitor()
        _train(model, optimizer, rank, TRAIN_STEPS - 1, seed=0)
        ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(99 + rank))
        model(input_ids=ids, labels=ids).loss.backward()
        monitor.record_gradients(model, TRAIN_STEPS)
        before_step = {
            "state": {key: _whole(value.detach()).clone() for key, value in model.state_dict().items()},
            "grads": {
                name: _whole(param.grad).clone()
                for name, param in model.named_parameters()
                if param.grad is not None
            },
        }
        optimizer.step()
        optimizer.zero_grad()
        record = monitor.check(model, TRAIN_STEPS, optimizer=optimizer)
        (out / f"monitor{rank}.json").write_text(json.dumps(record.to_dict()))
        trained = {key: _whole(value.detach()).clone() for key, value in model.state_dict().items()}
        if rank == 0:
            torch.save({"before_step": before_step, "trained": trained}, out / "trained.pt")

        # (b) Post-Squeeze at the end of training: every process joins the gather, the main one writes
        callback = PostSqueezeCallback(min_variance_retention=0.6, compress=True, print_table=False)
        args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[])
        state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
        callback.on_train_end(args, state, TrainerControl(), model=model)
        assert callback.error is None, callback.error
        assert (callback.analysis is not None) == (rank == 0)

        # (c) In-Squeeze: resize mode is refused (FSDP2's parameter set is fixed); mask mode: the main process
        # decides, every process writes its shard
        try:
            squeeze_model(model, SQUEEZED_RANK, mode="resize", optimizer=optimizer)
            refusal = None
        except LoraMonitorError as error:
            refusal = str(error)
        events = squeeze_model(model, SQUEEZED_RANK, mode="mask", optimizer=optimizer)
        assert len(events) == len(monitor.latest.metrics)
        gradient_mask = _gradient_mask_check(model, optimizer, rank)
        _train(model, optimizer, rank, STEPS_AFTER_SQUEEZE, seed=1000)
        factors = {
            name: _whole(param.detach()).clone()
            for name, param in model.named_parameters()
            if "lora_" in name
        }
        moments = {
            name: {
                key: _whole(value).clone() for key, value in optimizer.state[param].items() if value.dim() > 0
            }
            for name, param in model.named_parameters()
            if "lora_" in name
        }
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            model.save_pretrained(out / "final", state_dict=full_state)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
        torch.save(
            {
                "factors": factors,
                "moments": moments,
                "logits": logits,
                "gradient_mask": gradient_mask,
                "resize_refusal": refusal,
            },
            out / f"masked{rank}.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
