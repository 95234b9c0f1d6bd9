"""Spectral editing of a trained adapter: σ sensitivities from calibration data, edited singular values.

- :mod:`.options`: :class:`EditConfig` and the checks of every option (imports nothing heavy);
- :mod:`.data`: calibration texts read from a file, texts or tokenized rows made into batches, their mean loss;
- :mod:`.edit`: σ sensitivities, the edit rules, :func:`spectral_edit` and the edited adapter folder.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Names are imported on first use, so that the command checks the options (.options) before torch.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".data": ("calibration_batches", "evaluate_loss", "load_tokenizer", "read_texts"),
    ".edit": ("ModuleEdit", "SpectralEditResult", "spectral_edit"),
    ".options": ("MODES", "EditConfig", "check_batching", "edit_config"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .data import calibration_batches, evaluate_loss, load_tokenizer, read_texts
    from .edit import ModuleEdit, SpectralEditResult, spectral_edit
    from .options import MODES, EditConfig, check_batching, edit_config

__all__ = [
    "MODES",
    "EditConfig",
    "ModuleEdit",
    "SpectralEditResult",
    "calibration_batches",
    "check_batching",
    "edit_config",
    "evaluate_loss",
    "load_tokenizer",
    "read_texts",
    "spectral_edit",
]
