"""The options of :func:`~lora_monitor.allocation.allocate_ranks`, checked without importing torch.

``lora-monitor allocate`` checks them before it imports torch and loads the model (whose weight spectra take
minutes on a real model): a wrong ``--min-rank`` is answered at once.
"""

from __future__ import annotations

from ..errors import check_choice, check_number

# How xmin of the power-law fit is chosen: the median eigenvalue, or the best KS distance (WeightWatcher).
FIT_RULES = ("median", "ks")
# How ranks are spaced between min_rank and max_rank by score.
SCALINGS = ("linear", "log", "sqrt")


def check_fit(fit: object) -> str:
    """``fit`` if it is a power-law fit rule (``"median"`` or ``"ks"``), else a :class:`LoraMonitorError`."""
    return check_choice(fit, FIT_RULES, "fit", hint="the power-law fit rule for xmin")


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
) -> None:
    """A :class:`LoraMonitorError` naming the first of :func:`allocate_ranks`' options out of range.

    The command calls it before importing torch and loading the model: a bad ``--min-rank`` is answered at
    once."""
    check_number(min_rank, "min_rank", low=1, whole=True)
    check_number(max_rank, "max_rank", low=min_rank, whole=True, hint=f"min_rank={min_rank}")
    check_number(layer_fraction, "layer_fraction", low=0, low_open=True, high=1)
    check_number(alpha_factor, "alpha_factor", low=0, low_open=True)
    if parameter_budget is not None:
        check_number(parameter_budget, "parameter_budget", low=1, whole=True)
    check_choice(scaling, SCALINGS, "scaling", hint="how ranks are spaced by score")
    check_fit(fit)
    check_number(w_alpha, "w_alpha", low=0)
    check_number(w_spikes, "w_spikes", low=0)


__all__ = ["FIT_RULES", "SCALINGS", "check_allocation_options", "check_fit"]
