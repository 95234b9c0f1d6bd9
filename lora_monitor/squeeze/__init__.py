"""Deprecated: Post-Squeeze lives in :mod:`lora_monitor.post_squeeze` now (beside ``in_squeeze``).

Every name this package had still works for one release, with a :class:`DeprecationWarning` naming its new
place (and its new name where it changed: ``allocate_by_energy`` is ``budget_ranks_by_energy``, ...).
"""

from .._lazy import lazy_exports
from ..post_squeeze import __all__ as _post_squeeze_names

_NEW = "lora_monitor.post_squeeze"
_CONSOLE = "lora_monitor.render.console"
# old name -> "module:new name"
# post_squeeze's names that this package never had: the new names of the four renamed below, and the chooser
_ADDED = {
    "BudgetRanks",
    "budget_ranks_by_energy",
    "budget_ranks_by_sensitivity",
    "default_candidate_ranks",
    "compression_rank",
    "compression_ranks",
}
_RENAMED: dict[str, str] = {
    # every other name of post_squeeze is one this package had, under the same name
    **{name: f"{_NEW}:{name}" for name in _post_squeeze_names if name not in _ADDED},
    "BudgetAllocation": f"{_NEW}:BudgetRanks",
    "allocate_by_energy": f"{_NEW}:budget_ranks_by_energy",
    "allocate_by_sensitivity": f"{_NEW}:budget_ranks_by_sensitivity",
    "default_target_ranks": f"{_NEW}:default_candidate_ranks",
    "print_analysis": f"{_CONSOLE}:print_analysis",
    "squeeze_table": f"{_CONSOLE}:squeeze_table",
    "summary_lines": f"{_CONSOLE}:summary_lines",
}
__getattr__, __dir__ = lazy_exports(__name__, {}, _RENAMED)
__all__ = sorted(_RENAMED)
