"""Every table lora-monitor prints, drawn with rich: one function per table, no computation of its own."""

from __future__ import annotations

# ---- the monitor's analysis table (`lora-monitor analyze`) ---------------------------------------------


# ---- the Post-Squeeze retention table (`lora-monitor squeeze`, PostSqueezeCallback) ----------------------


# ---- the rank allocation table (`lora-monitor allocate`) --------------------------------------------------


# ---- the spectral edit table (`lora-monitor edit`) -------------------------------------------------------
