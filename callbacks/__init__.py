"""Trainer bindings: thin ``transformers.TrainerCallback`` loops over the lora-monitor core.

from lora_monitor.callbacks import SpectralMonitorCallback, InSqueezeCallback, PostSqueezeCallback
"""

from .in_squeeze import InSqueezeCallback
from .monitor import SpectralMonitorCallback
from .post_squeeze import PostSqueezeCallback

__all__ = ["InSqueezeCallback", "PostSqueezeCallback", "SpectralMonitorCallback"]
