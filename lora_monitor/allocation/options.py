"""The options of :func:`~lora_monitor.allocation.allocate_ranks`, checked without importing torch.

``lora-monitor allocate`` checks them before it imports torch and loads the model (whose weight spectra take
minutes on a real model): a wrong ``--min-rank`` is answered at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice, check_number

# How xmin of the power-law fit is chosen: the median eigenvalue, or the best KS distance (WeightWatcher).
FIT_RULES = ("median", "ks")
# How ranks are spaced between min_rank and max_rank by score.
SCALINGS = ("linear", "log", "sqrt")


def check_fit(fit: object) -> str:
    """``fit`` if it is a power-law fit rule (``"median"`` or ``"ks"``), else a :class:`LoraMonitorError`."""
    return check_choice(fit, FIT_RULES, "fit", hint="the power-law fit rule for xmin")


@dataclass(frozen=True)
class AllocationOptions:
    """The options of :func:`~lora_monitor.allocation.allocate_ranks` (see it for each field), checked when
    made: a :class:`LoraMonitorError` names the first option out of range."""

    min_rank: int = 4
    max_rank: int = 64
    layer_fraction: float = 0.5
    alpha_factor: float = 2.0
    parameter_budget: int | None = None
    scaling: str = "linear"
    fit: str = "median"
    w_alpha: float = 0.7
    w_spikes: float = 0.3

    def __post_init__(self) -> None:
        check_number(self.min_rank, "min_rank", low=1, whole=True)
        check_number(
            self.max_rank, "max_rank", low=self.min_rank, whole=True, hint=f"min_rank={self.min_rank}"
        )
        check_number(self.layer_fraction, "layer_fraction", low=0, low_open=True, high=1)
        check_number(self.alpha_factor, "alpha_factor", low=0, low_open=True)
        if self.parameter_budget is not None:
            check_number(self.parameter_budget, "parameter_budget", low=1, whole=True)
        check_choice(self.scaling, SCALINGS, "scaling", hint="how ranks are spaced by score")
        check_fit(self.fit)
        check_number(self.w_alpha, "w_alpha", low=0)
        check_number(self.w_spikes, "w_spikes", low=0)


def check_allocation_options(
    min_rank: int,
    max_rank: int,
    layer_fraction: float,
    alpha_factor: float,
    parameter_budget: int | None,
    *,
    scaling: str = "linear",
    fit: str = "median",
    w_alpha: float = 0.7,
    w_spikes: float = 0.3,
) -> AllocationOptions:
    """The :class:`AllocationOptions` of :func:`allocate_ranks`' arguments, or a :class:`LoraMonitorError`
    naming the first one out of range.

    The command calls it before importing torch and loading the model: a bad ``--min-rank`` is answered at
    once."""
    return AllocationOptions(
        min_rank, max_rank, layer_fraction, alpha_factor, parameter_budget, scaling, fit, w_alpha, w_spikes
    )


__all__ = ["FIT_RULES", "SCALINGS", "AllocationOptions", "check_allocation_options", "check_fit"]
