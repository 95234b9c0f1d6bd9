"""The loss on the latest training batch, measured just before and just after a squeeze."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class LossProbe:
    """The model's loss on the latest training batch, measured without a gradient (NaN when unknown).

    A forward pre-hook keeps a reference to the keyword inputs of the latest training forward pass that
    had ``labels``; a trainer that computes the loss outside the model (GRPO) leaves it empty.
    """

    def __init__(self) -> None:
        self._inputs: dict[str, Any] | None = None
        self._probing = False
        self._hook: Any = None

    def attach(self, model: nn.Module) -> None:
        """Start watching ``model``'s training batches (once)."""
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def detach(self) -> None:
        """Stop watching and let go of the last batch."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._inputs = None

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._probing and module.training and kwargs.get("labels") is not None:
            self._inputs = kwargs

    def loss(self, model: nn.Module) -> float:
        """The loss on the remembered batch, in eval mode (no dropout), or NaN."""
        if self._inputs is None:
            return math.nan
        was_training = model.training
        self._probing = True
        try:
            model.eval()
            with torch.no_grad():
                output = model(**self._inputs)
            loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
            return float(loss) if loss is not None else math.nan
        finally:
            self._probing = False
            model.train(was_training)
