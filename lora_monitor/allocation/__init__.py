"""Rank before training: heavy-tailed spectra of the base weights, per-layer rank allocation, a gradient probe.

- :mod:`.options`: :class:`AllocationOptions` and :func:`check_allocation_options`, the check of the allocation's numbers (imports nothing heavy);
- :mod:`.htsr`: power-law and Marchenko-Pastur fits of one weight's eigenvalues, :class:`LayerSpectrum`;
- :mod:`.allocate`: the weights LoRA could adapt, their spectra, :func:`allocate_ranks`;
- :mod:`.probe`: :func:`probe_rank`, the rank the loss gradient of a few batches asks for.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Names are imported on first use, so that the command checks the options (.options) before torch.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".allocate": ("LayerAllocation", "RankAllocation", "allocate_ranks", "spectral_analysis"),
    ".htsr": (
        "BulkFit",
        "LayerSpectrum",
        "PowerLawFit",
        "fit_marchenko_pastur",
        "fit_power_law",
        "spectra_from_eigenvalues",
    ),
    ".options": ("AllocationOptions", "check_allocation_options"),
    ".probe": ("RankProbe", "probe_rank"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .allocate import LayerAllocation, RankAllocation, allocate_ranks, spectral_analysis
    from .htsr import (
        BulkFit,
        LayerSpectrum,
        PowerLawFit,
        fit_marchenko_pastur,
        fit_power_law,
        spectra_from_eigenvalues,
    )
    from .options import AllocationOptions, check_allocation_options
    from .probe import RankProbe, probe_rank

__all__ = [
    "AllocationOptions",
    "BulkFit",
    "LayerAllocation",
    "LayerSpectrum",
    "PowerLawFit",
    "RankAllocation",
    "RankProbe",
    "allocate_ranks",
    "check_allocation_options",
    "fit_marchenko_pastur",
    "fit_power_law",
    "probe_rank",
    "spectra_from_eigenvalues",
    "spectral_analysis",
]
