"""In-Squeeze: shrinking the rank of live PEFT LoRA modules while training, with the optimizer state."""

from .resize import (
    MODES,
    ResizeEvent,
    compact_masks,
    current_ranks,
    install_rank_hooks,
    resize_lora_module,
    squeeze_model,
    unwrap_optimizer,
)

__all__ = [
    "MODES",
    "ResizeEvent",
    "compact_masks",
    "current_ranks",
    "install_rank_hooks",
    "resize_lora_module",
    "squeeze_model",
    "unwrap_optimizer",
]
