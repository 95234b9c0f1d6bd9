"""Rank before training: heavy-tailed spectra of the base weights, per-layer rank allocation, a gradient probe.

- :mod:`.htsr`: power-law and Marchenko-Pastur fits of one weight's eigenvalues, :class:`LayerSpectrum`;
- :mod:`.allocate`: the weights LoRA could adapt, their spectra, :func:`allocate_ranks`;
- :mod:`.probe`: :func:`probe_rank`, the rank the loss gradient of a few batches asks for.
"""

from .allocate import LayerAllocation, RankAllocation, allocate_ranks, spectral_analysis
from .htsr import (
    BulkFit,
    LayerSpectrum,
    PowerLawFit,
    fit_marchenko_pastur,
    fit_power_law,
    spectra_from_eigenvalues,
)
from .probe import RankProbe, probe_rank

__all__ = [
    "BulkFit",
    "LayerAllocation",
    "LayerSpectrum",
    "PowerLawFit",
    "RankAllocation",
    "RankProbe",
    "allocate_ranks",
    "fit_marchenko_pastur",
    "fit_power_law",
    "probe_rank",
    "spectra_from_eigenvalues",
    "spectral_analysis",
]
