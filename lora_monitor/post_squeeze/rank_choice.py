"""The one rule for the rank an adapter is compressed at, used by :func:`compress_adapter`, the
``lora-monitor squeeze`` command and the end of training alike, so that the three never disagree.

In order: the rank the user gave (``target_rank``); one rank per module (``per_module``: each module's
smallest rank keeping the threshold); the rank measured on held-out loss, when it was measured; the energy
table's recommended rank. No candidate reaching the threshold is an error naming the closest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import LoraMonitorError
from .analysis import ALL_ZERO
from .options import SqueezeOptions

if TYPE_CHECKING:
    from .analysis import SqueezeAnalysis
    from .held_out import FunctionRecommendation


class _RankedModule(Protocol):
    name: str
    rank: int


def compression_rank(
    options: SqueezeOptions,
    analysis: SqueezeAnalysis | None,
    function: FunctionRecommendation | None = None,
    *,
    hint: str = "give target_rank to compress anyway",
) -> int | None:
    """The one rank every module is compressed at, or None with ``options.per_module`` (each module its own:
    :func:`compression_ranks`). ``analysis`` may be None only when ``options.target_rank`` is given.

    Raises :class:`LoraMonitorError` when no candidate rank reaches the threshold (or every delta is zero),
    naming ``analysis.source``, why, and ``hint`` (what the caller's user can do about it).
    """
    if options.target_rank is not None:
        return options.target_rank
    if analysis is None:
        raise ValueError("compression_rank needs an analysis unless options.target_rank is given")
    if analysis.num_modules == 0:  # an untrained adapter: no rule (per module, by function) gives it a rank
        raise LoraMonitorError(f"{analysis.source}: {ALL_ZERO}; nothing was written ({hint})")
    if options.per_module:
        return None
    if function is not None:
        return function.recommended_rank
    if analysis.recommended_rank is None:
        raise LoraMonitorError(
            f"{analysis.source}: {analysis.why_no_recommendation()}; nothing was written ({hint})"
        )
    return analysis.recommended_rank


def compression_ranks(
    modules: Sequence[_RankedModule],
    options: SqueezeOptions,
    analysis: SqueezeAnalysis | None,
    function: FunctionRecommendation | None = None,
    *,
    hint: str = "give target_rank to compress anyway",
) -> dict[str, int]:
    """The new rank of each of ``modules``: :func:`compression_rank` (never above a module's own rank), or with
    ``options.per_module`` each module's smallest rank keeping the threshold (at least 1: PEFT needs r >= 1,
    so a zero delta keeps one zero direction)."""
    rank = compression_rank(options, analysis, function, hint=hint)
    if rank is None:
        assert analysis is not None
        minimal = {module.name: module.minimal_rank for module in analysis.modules}
        return {module.name: max(1, minimal[module.name]) for module in modules}
    return {module.name: min(rank, module.rank) for module in modules}
