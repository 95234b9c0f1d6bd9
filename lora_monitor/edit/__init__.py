"""Spectral editing of a trained adapter: σ sensitivities from calibration data, edited singular values."""

from .edit import EditConfig, SpectralEditResult, calibration_batches, evaluate_loss, spectral_edit

__all__ = ["EditConfig", "SpectralEditResult", "calibration_batches", "evaluate_loss", "spectral_edit"]
