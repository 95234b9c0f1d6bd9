"""Importing lora_monitor and then PEFT prints nothing of bitsandbytes' CPU-kernel fallback, and only that
one bitsandbytes message is dropped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _stderr_of(code: str) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300, check=True
    )
    return result.stderr


@pytest.mark.slow
def test_import_of_lora_monitor_then_peft_has_no_bitsandbytes_kernel_message():
    if KERNEL_MESSAGE not in _stderr_of("import peft"):
        pytest.skip("bitsandbytes does not print its CPU kernel message on this machine or install")
    assert KERNEL_MESSAGE not in _stderr_of("import lora_monitor, peft")


def test_other_bitsandbytes_warnings_still_show(caplog):
    import lora_monitor  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(KERNEL_MESSAGE + ": No module named 'kernels'")
        logger.warning("a 4-bit weight could not be dequantized")
    assert [record.getMessage() for record in caplog.records] == ["a 4-bit weight could not be dequantized"]
