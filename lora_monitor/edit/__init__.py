"""Spectral editing of a trained adapter: σ sensitivities from calibration data, edited singular values.

- :mod:`.data`: calibration texts read from a file, texts or tokenized rows made into batches, their mean loss;
- :mod:`.edit`: σ sensitivities, the edit rules, :func:`spectral_edit` and the edited adapter folder.
"""

from .data import calibration_batches, evaluate_loss, load_tokenizer, read_texts
from .edit import EditConfig, ModuleEdit, SpectralEditResult, spectral_edit

__all__ = [
    "EditConfig",
    "ModuleEdit",
    "SpectralEditResult",
    "calibration_batches",
    "evaluate_loss",
    "load_tokenizer",
    "read_texts",
    "spectral_edit",
]
