"""Rank before training: heavy-tailed spectra of the base weights, per-layer rank allocation, a gradient probe."""

from .allocate import (
    LayerSpectrum,
    RankAllocation,
    RankProbe,
    allocate_ranks,
    fit_marchenko_pastur,
    fit_power_law,
    probe_rank,
    spectra_from_eigenvalues,
    spectral_analysis,
)

__all__ = [
    "LayerSpectrum",
    "RankAllocation",
    "RankProbe",
    "allocate_ranks",
    "fit_marchenko_pastur",
    "fit_power_law",
    "probe_rank",
    "spectra_from_eigenvalues",
    "spectral_analysis",
]
