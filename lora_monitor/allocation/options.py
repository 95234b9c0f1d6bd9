"""The numeric options of :func:`~lora_monitor.allocation.allocate_ranks`, checked without importing torch.

``lora-monitor allocate`` checks them before it imports torch and loads the model (whose weight spectra take
minutes on a real model): a wrong ``--min-rank`` is answered at once.
"""

from __future__ import annotations

from ..errors import check_number


def check_allocation_options(
    min_rank: int, max_rank: int, layer_fraction: float, alpha_factor: float, parameter_budget: int | None
) -> None:
    """A :class:`LoraMonitorError` naming the first of :func:`allocate_ranks`' numeric options out of range.

    The command calls it before importing torch and loading the model: a bad ``--min-rank`` is answered at
    once."""
    check_number(min_rank, "min_rank", low=1, whole=True)
    check_number(max_rank, "max_rank", low=min_rank, whole=True, hint=f"min_rank={min_rank}")
    check_number(layer_fraction, "layer_fraction", low=0, low_open=True, high=1)
    check_number(alpha_factor, "alpha_factor", low=0, low_open=True)
    if parameter_budget is not None:
        check_number(parameter_budget, "parameter_budget", low=1, whole=True)


__all__ = ["check_allocation_options"]
