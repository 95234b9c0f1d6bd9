"""Helpers for the Post-Squeeze tests: adapters with a decaying spectrum, and dense reference deltas.

The references here are computed independently of lora-monitor: PEFT's own ``get_delta_weight`` gives
each module's ``ΔW`` and a dense float64 ``torch.linalg.svd`` gives its best rank-k approximation.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

PREFIX = "base_model.model."


def decay_spectrum(model: torch.nn.Module, ratio: float = 0.55, adapter: str = "default") -> torch.nn.Module:
    """Scale row ``i`` of every ``A`` by ``ratio**i`` so each delta has clearly separated singular values."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if adapter in module.lora_A:
                A = module.lora_A[adapter].weight
            elif adapter in module.lora_embedding_A:
                A = module.lora_embedding_A[adapter]
            else:
                continue
            shape = (-1,) + (1,) * (A.dim() - 1)
            A.mul_((ratio ** torch.arange(A.shape[0], dtype=torch.float64)).to(A.dtype).reshape(shape))
    return model


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraLayer]:
    """The LoRA layers holding ``adapter``, by module name in the base model (PEFT's matching key)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            layers[name.removeprefix(PREFIX)] = module
    return layers


def dense_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Every module's ``ΔW`` from PEFT's ``get_delta_weight``, as a float64 matrix (conv flattened)."""
    return {
        name: layer.get_delta_weight(adapter).detach().double().flatten(1)
        for name, layer in lora_layers(model, adapter).items()
    }


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young: the dense truncated SVD of ``matrix`` in float64."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def energy_retained(matrix: torch.Tensor, k: int) -> float:
    """Fraction of ``‖M‖²_F`` in the top ``k`` singular values (dense SVD)."""
    S = torch.linalg.svdvals(matrix.double())
    return float((S[:k] ** 2).sum() / (S**2).sum())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


class TinyConvNet(torch.nn.Module):
    """Two Conv2d layers (3×3 kernels), enough for PEFT's conv LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def tiny_conv_net(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def offline_wandb_records(run_dir, timeout: float = 120.0) -> list:
    """The records of a finished offline W&B run (``run-*.wandb``), parsed with W&B's own protobufs.

    The log is W&B's LevelDB-style record file: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    wandb-core may still be flushing it when ``wandb.finish()`` returns, so the records are read once the
    run's exit record is in the file (never a fixed sleep; a run that has no exit record within ``timeout``
    fails the test with what was found).
    """
    import time
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        records = [wandb_internal_pb2.Record.FromString(raw) for raw in _wandb_log_records(Path(run_dir))]
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, (
            f"{run_dir}: no exit record after {timeout} s ({len(records)} records)"
        )
        time.sleep(0.2)


def offline_wandb_summary(run_dir) -> dict:
    """The summary of a finished offline W&B run: ``files/wandb-summary.json`` where the client wrote one,
    else the summary records of its log (wandb 0.31 writes the json only when syncing)."""
    import json
    from pathlib import Path

    summary_file = Path(run_dir) / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    summary = {}
    for record in offline_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def offline_wandb_history_keys(run_dir) -> set[str]:
    """Every key logged to the history of a finished offline W&B run."""
    keys = set()
    for record in offline_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def _wandb_log_records(run_dir) -> list[bytes]:
    import struct

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of a block
            position += left
            continue
        if position + 7 + length > len(data):  # a record still being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records
