"""The record every room works on: one LoRA pair, from a live PEFT model or an adapter folder.

:class:`LoraModule` holds the factors as matrices (``B: m×r``, ``A: r×n``, so that ``ΔW = scale · B @ A``),
the scale exactly as PEFT applies it, and what kind of layer it adapts. :mod:`.modules` builds it from a
live model, :mod:`.saved` from a folder; it sits in a file of its own so that both can import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .factors import full_tensor, is_sharded
from .naming import module_block


@dataclass
class LoraModule:
    """One LoRA pair.

    ``name`` is the module's path in the base model, exactly the key PEFT matches ``target_modules``,
    ``rank_pattern`` and ``alpha_pattern`` against (``model.layers.0.self_attn.q_proj``). ``A``/``B`` are
    matrices in the factors' own dtype: a conv kernel is flattened to ``r × (in·kh·kw)``, an embedding's
    ``lora_embedding_A`` is ``r × num_embeddings``. ``scale`` is the module's ``s`` in ``ΔW = s·B@A``.
    ``base_weight`` is the frozen weight the pair adapts, where available (live models only).
    """

    name: str
    module_type: str
    layer_index: int | None
    kind: str  # "linear", "embedding" or "conv"
    rank: int
    alpha: float
    scale: float
    use_rslora: bool
    use_dora: bool
    adapter_name: str
    A_shape: tuple[int, ...]
    B_shape: tuple[int, ...]
    load_A: Callable[[], torch.Tensor] = field(repr=False)
    load_B: Callable[[], torch.Tensor] = field(repr=False)
    module: torch.nn.Module | None = field(default=None, repr=False)
    keys: dict[str, str] = field(default_factory=dict, repr=False)  # state-dict keys in a saved adapter
    # The live (B, A) Parameters, where the record was made to read them directly (None: looked up).
    live_parameters: tuple[torch.nn.Parameter, torch.nn.Parameter] | None = field(default=None, repr=False)

    @property
    def A(self) -> torch.Tensor:
        """``r × n`` matrix (a view of the live parameter, or read from disk now)."""
        # Shaped from the tensor itself, so a record stays right after In-Squeeze changed the rank.
        factor = self.load_A()
        return factor if factor.dim() == 2 else factor.reshape(factor.shape[0], -1)

    @property
    def B(self) -> torch.Tensor:
        """``m × r`` matrix (a conv ``lora_B`` kernel is ``out × r × 1 × 1``)."""
        factor = self.load_B()
        return factor if factor.dim() == 2 else factor.reshape(factor.shape[0], -1)

    @property
    def is_finite(self) -> bool:
        """Whether both factors hold finite values only (no NaN, no Inf)."""
        return bool(torch.isfinite(self.B).all() and torch.isfinite(self.A).all())

    @property
    def is_attention(self) -> bool:
        """True for attention projections (q, k, v, o and their fused forms), False for MLP and others."""
        return self.block == "attention"

    @functools.cached_property
    def block(self) -> str:
        """``"attention"``, ``"mlp"`` or ``"other"`` (see :func:`~lora_monitor.adapters.naming.module_block`).

        Worked out once per record: a monitor reads it for every module at every check."""
        return module_block(self.name)

    @property
    def base_layer(self) -> torch.nn.Module | None:
        """The frozen layer this pair adapts (live models only)."""
        return self.module.get_base_layer() if self.module is not None else None

    def base_weight(self) -> torch.Tensor | None:
        """The frozen weight as a float matrix (quantized 4/8-bit weights are dequantized), or None.

        Under FSDP2 the weight is gathered whole: a collective, every process must ask in the same order.
        """
        layer = self.base_layer
        if layer is None or getattr(layer, "weight", None) is None:
            return None
        if is_sharded(layer.weight):
            weight = full_tensor(layer.weight.detach())
        else:
            from peft.utils.integrations import dequantize_module_weight

            weight = dequantize_module_weight(layer).detach()
        return weight.reshape(weight.shape[0], -1)
