"""lora-monitor: see whether a LoRA adapter uses its rank, squeeze it while or after training.

The public API, one screen:

    Finding LoRA pairs      find_lora_modules(model), load_adapter(path)  -> LoraModule records
    The spectrum engine     factored_svd, lora_spectra, truncate_factors, randomized_svd, LinearOperator,
                            effective_rank, stable_rank, condition_number, energy_curve, spectral_norm
    Trainer callbacks       from lora_monitor.callbacks import (SpectralMonitorCallback,
                                                                InSqueezeCallback, PostSqueezeCallback)
    Errors                  LoraMonitorError (bad input, with a message naming the file or module)
"""

from .adapters import LoraModule, SavedAdapter, find_lora_modules, load_adapter, lora_modules, scale_for
from .errors import LoraMonitorError
from .spectrum import (
    LinearOperator,
    LoraSpectra,
    SVDResult,
    TruncatedFactors,
    condition_number,
    effective_rank,
    energy_curve,
    factored_svd,
    lora_spectra,
    randomized_svd,
    rank_for_energy,
    spectral_norm,
    stable_rank,
    truncate_factors,
)

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "LoraModule",
    "LoraMonitorError",
    "LoraSpectra",
    "SVDResult",
    "SavedAdapter",
    "TruncatedFactors",
    "condition_number",
    "effective_rank",
    "energy_curve",
    "factored_svd",
    "find_lora_modules",
    "load_adapter",
    "lora_modules",
    "lora_spectra",
    "randomized_svd",
    "rank_for_energy",
    "scale_for",
    "spectral_norm",
    "stable_rank",
    "truncate_factors",
]
