"""Trainer bindings: thin ``transformers.TrainerCallback`` loops over the lora-monitor core.

from lora_monitor.callbacks import SpectralMonitorCallback, InSqueezeCallback, PostSqueezeCallback
"""
