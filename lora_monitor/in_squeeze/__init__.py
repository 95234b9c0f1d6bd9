"""In-Squeeze: shrinking the rank of live PEFT LoRA modules while training, with the optimizer state.

- :mod:`.resize`: resize and mask modes on live modules (:func:`squeeze_model`, :func:`resize_lora_module`,
  :func:`compact_masks`, :func:`compact_after_training`, :func:`current_ranks`);
- :mod:`.optimizer`: the optimizer state carried through the factor maps, or reset;
- :mod:`.hooks`: gradient masks and the state-dict hooks for saving and resuming (:func:`install_rank_hooks`);
- :mod:`.schedule`: when and to which rank, and the record of each squeeze;
- :mod:`.loss_probe`: the loss on the latest training batch just before and after a squeeze;
- :mod:`.rewarmup`: the learning rate ramped back up over a few steps after a squeeze;
- :mod:`.options`: the options and their one validator;
- :mod:`.resume`: what a checkpoint keeps besides the factors, so that a resumed run is the uninterrupted run;
- :mod:`.run`: :class:`InSqueezeRun`, all of the above over one run, step by step (what ``InSqueezeCallback``
  drives from the Trainer's hooks; any training loop can drive it).
"""

from .hooks import install_rank_hooks
from .loss_probe import LossProbe
from .optimizer import unwrap_optimizer
from .options import CALLBACK_MODES, METHODS, MODES, OPTIMIZER_STATES, SCHEDULES, InSqueezeOptions
from .resize import (
    ResizeEvent,
    compact_after_training,
    compact_masks,
    current_ranks,
    resize_lora_module,
    squeeze_model,
)
from .rewarmup import LearningRateRewarmup
from .run import InSqueezeRun
from .schedule import plan_schedule, resolve_step

__all__ = [
    "CALLBACK_MODES",
    "METHODS",
    "MODES",
    "OPTIMIZER_STATES",
    "SCHEDULES",
    "InSqueezeOptions",
    "InSqueezeRun",
    "LearningRateRewarmup",
    "LossProbe",
    "ResizeEvent",
    "compact_after_training",
    "compact_masks",
    "current_ranks",
    "install_rank_hooks",
    "plan_schedule",
    "resize_lora_module",
    "resolve_step",
    "squeeze_model",
    "unwrap_optimizer",
]
