"""A gradient probe: the LoRA rank each module type needs, read from the loss gradient before training.

Where :mod:`.allocate` looks at the frozen weights, :func:`probe_rank` looks at the data: the singular values
of the loss gradient with respect to each target weight, accumulated over a few batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import describe_module, unwrap_model
from ..edit.data import finite_loss, is_causal_lm, scored_tokens
from ..errors import LoraMonitorError, check_number
from ..spectrum import energy_curve, rank_for_energy, reaches, weight_singular_values
from .allocate import analysable_weights

Tensor = torch.Tensor

# What the probe's rank is worth, measured against the knee (the smallest directly trained rank within the
# noise of the best) in bench/EVIDENCE.md: equal on one task, 8-16x too high on two.
PROBE_CAVEAT = (
    "an upper bound, not advice: against the smallest rank that lost nothing on held-out data it was equal on "
    "a one-token answer task (SmolLM2, r=2), 16× too high on a classifier (MiniLM, r=64 against 4) and 8× on "
    "learning text (SmolLM2, r=128 against 16)"
)


@dataclass
class RankProbe:
    """What the loss gradient of a few batches says about the rank each module type needs.

    ``module_ranks`` is the smallest rank holding ``threshold`` of each module's accumulated gradient energy;
    ``type_ranks`` the same for each module type (from the mean energy curve of its modules), rounded up to
    a power of two; ``rank`` the largest of those. ``energy_curves`` holds each module's cumulative energy.
    """

    rank: int
    type_ranks: dict[str, int]
    module_ranks: dict[str, int]
    energy_curves: dict[str, Tensor]
    threshold: float
    steps: int

    def summary(self) -> str:
        """``Based on your data, r=16 (q_proj 8, v_proj 16, ...; ...), an upper bound ...``: the reading and
        what it is worth (:data:`PROBE_CAVEAT`)."""
        parts = ", ".join(f"{kind} {rank}" for kind, rank in self.type_ranks.items())
        return (
            f"Based on your data, r={self.rank} ({parts}; {self.threshold:.0%} of the gradient energy of "
            f"{self.steps} batches), {PROBE_CAVEAT}"
        )


def _next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def probe_rank(
    model: nn.Module,
    dataloader: Iterable[dict[str, Any]],
    steps: int = 4,
    target_modules: str | Sequence[str] | None = None,
    threshold: float = 0.9,
    *,
    device: torch.device | str | None = None,
) -> RankProbe:
    """Recommend a LoRA rank per module type from the loss gradient, before any training step.

    Runs ``steps`` batches from ``dataloader`` (dicts of tensors for ``model(**batch)``, with labels so that
    the model returns a loss), sums the gradient of the loss with respect to each target weight (the same
    weights :func:`spectral_analysis` would pick), and reads the rank that keeps ``threshold`` of the
    summed gradient's energy.

    What it is worth (``bench/EVIDENCE.md``, against the knee: the smallest directly trained rank within the
    noise of the best): on SmolLM2-135M answering one token (sentiment) it gave r=2, the knee; on SmolLM2-135M
    learning text (convention speeches) r=128 against a knee of 16, every MLP type at its cap (the gradient
    before any step spreads over many directions of the MLP weights, and training needs few of them); on a
    sequence classifier with a freshly initialised head (MiniLM on Rotten Tomatoes) r=64 against a knee of 4,
    the gradient shaped by the random head. Read it as an upper bound, never as the rank to train
    (:meth:`RankProbe.summary` says so); for a model that is not a causal LM it also warns.

    A batch that scores no label (one-token texts of a causal LM) is skipped, a
    NaN/Inf loss is a :class:`LoraMonitorError`: no advice from a NaN gradient. Nothing is updated: gradients are taken with ``torch.autograd.grad`` (no
    ``.grad`` is written), and every ``requires_grad`` flag is restored afterwards.
    """
    check_number(threshold, "threshold", low=0, low_open=True, high=1)
    check_number(steps, "steps", low=1, whole=True)
    records = analysable_weights(model, target_modules, include_embeddings=False)
    if not records:
        raise LoraMonitorError(f"no Linear/Conv weights to probe in {type(model).__name__}")
    weights = [record.module.weight for record in records]
    for record, weight in zip(records, weights, strict=True):
        if not weight.is_floating_point():
            raise LoraMonitorError(
                f"module {record.name}: cannot take gradients of a quantized ({weight.dtype}) weight"
            )
    causal = is_causal_lm(model)
    if not causal:
        warnings.warn(
            f"probe_rank: {type(unwrap_model(model)).__name__} is not a causal LM; with a freshly initialised "
            "output head the gradient before any step reflects the random head (measured: r=64 against a knee of "
            "4 on a MiniLM classifier), so read its rank as an upper bound, not advice",
            UserWarning,
            stacklevel=2,
        )
    saved_flags = [p.requires_grad for p in model.parameters()]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    model_device = next(model.parameters()).device
    done = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for index, batch in enumerate(dataloader):
            if done >= steps:
                break
            inputs = {k: v.to(model_device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if isinstance(inputs.get("labels"), Tensor) and not scored_tokens(inputs, causal):
                continue  # a mean over no label is NaN, and so would be every gradient summed after it
            output = model(**inputs)
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if loss is None:
                raise LoraMonitorError("the model returned no loss: give batches with labels")
            finite_loss(loss.detach(), "dataloader", index)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.detach().float())
            done += 1
    finally:
        for p, flag in zip(model.parameters(), saved_flags, strict=True):
            p.requires_grad_(flag)
    if done == 0:
        raise LoraMonitorError(
            "the dataloader gave no batches to probe with (none, or none with a label to predict)"
        )

    matrices = [
        g.T if _is_conv1d(record.module) else g.reshape(record.rows, record.columns)
        for g, record in zip(sums, records, strict=True)
    ]
    singular_values = weight_singular_values(matrices, device=device, dtype=torch.float32)
    curves: dict[str, Tensor] = {}
    module_ranks: dict[str, int] = {}
    by_type: dict[str, list[Tensor]] = {}
    for record, values in zip(records, singular_values, strict=True):
        curves[record.name] = energy_curve(values)
        module_ranks[record.name] = rank_for_energy(values, threshold)
        if not torch.isnan(curves[record.name]).all():
            by_type.setdefault(describe_module(record.name)[0], []).append(curves[record.name])
    type_ranks: dict[str, int] = {}
    for kind, kind_curves in by_type.items():
        length = min(c.shape[0] for c in kind_curves)
        mean_curve = torch.stack([c[:length] for c in kind_curves]).mean(0)
        reached = reaches(mean_curve, threshold).nonzero()
        needed = int(reached[0]) + 1 if len(reached) else length
        type_ranks[kind] = min(_next_power_of_two(needed), length)
    if not type_ranks:  # every target's summed gradient is zero (or NaN): there is no rank to read from it
        raise LoraMonitorError(
            f"probe_rank: no target weight received a gradient over {done} batch(es) (every summed gradient "
            "is zero): the loss does not depend on them (a model whose weights are all zero?), so there is no "
            "rank to read"
        )
    return RankProbe(max(type_ranks.values()), type_ranks, module_ranks, curves, threshold, done)


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)
