"""The errors lora-monitor raises on bad input: one class, one clear message naming the file or module."""

from __future__ import annotations


class LoraMonitorError(ValueError):
    """Bad input: a missing or corrupt adapter, a model without LoRA, an unknown adapter name, a bad option.

    The message names the file, folder, module or option concerned and what is wrong with it. The command
    line prints it (without a traceback) and exits with status 2.
    """
