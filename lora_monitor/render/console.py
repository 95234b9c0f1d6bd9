"""Every table lora-monitor prints, drawn with rich: one function per table, no computation of its own."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..squeeze.analysis import SqueezeAnalysis

# ---- the monitor's analysis table (`lora-monitor analyze`) ---------------------------------------------


# ---- the Post-Squeeze retention table (`lora-monitor squeeze`, PostSqueezeCallback) ----------------------


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.2f}%"


def squeeze_table(analysis: SqueezeAnalysis) -> Table:
    """The variance table as a ``rich.table.Table``; the recommended row is marked ``<--``."""
    from rich.table import Table

    table = Table(title=f"Post-Squeeze: {analysis.source}", title_justify="left")
    for column in ("Rank", "Mean Var%", "Min Var%", "Max Var%", "Weighted Var%"):
        table.add_column(column, justify="right")
    table.add_column("", justify="left")
    for row in analysis.rows():
        table.add_row(
            str(row["rank"]),
            _percent(row["mean_variance"]),
            _percent(row["min_variance"]),
            _percent(row["max_variance"]),
            _percent(row["weighted_variance"]),
            "<--" if row["recommended"] else "",
            style="bold green" if row["recommended"] else None,
        )
    return table


def summary_lines(analysis: SqueezeAnalysis) -> list[str]:
    """The sentences printed under the table: source rank, modules, recommendation, per-group advice."""
    percent = f"{100 * analysis.min_variance_retention:g}%"
    lines = [f"Source rank: {analysis.source_rank}    LoRA modules analysed: {analysis.num_modules}"]
    if analysis.zero_modules:
        shown = ", ".join(analysis.zero_modules[:5]) + (" ..." if len(analysis.zero_modules) > 5 else "")
        lines.append(
            f"{len(analysis.zero_modules)} module(s) have an all-zero delta and are left out of the table: {shown}"
        )
    if analysis.recommended_rank is None:
        lines.append(f"No recommendation: {analysis.why_no_recommendation()}")
        return lines
    lines.append(f"Recommended rank: {analysis.recommended_rank} (mean >= {percent} variance retained)")
    if analysis.recommended_rank_weighted is None:
        lines.append(
            f"Energy-weighted: no rank in {analysis.target_ranks} keeps {percent} of the whole adapter"
        )
    else:
        lines.append(
            f"Energy-weighted: rank {analysis.recommended_rank_weighted} keeps >= {percent} of the whole "
            "adapter's ‖ΔW‖²"
        )
    blocks = [
        f"{group.recommended_rank} for {name}"
        for name, group in analysis.by_block.items()
        if group.recommended_rank is not None
    ]
    if len(blocks) > 1:
        lines.append("By block: rank " + ", ".join(blocks))
    types = [
        f"{name} {group.recommended_rank}"
        for name, group in analysis.by_module_type.items()
        if group.recommended_rank is not None
    ]
    lines.append("By module type: " + ", ".join(types))
    return lines


def print_analysis(analysis: SqueezeAnalysis, console: Console | None = None) -> None:
    """Print the variance table and the recommendation with rich (to stdout unless a Console is given)."""
    from rich.console import Console

    console = console or Console()
    console.print(squeeze_table(analysis))
    for line in summary_lines(analysis):
        console.print(line, highlight=False, markup=False)


# ---- the rank allocation table (`lora-monitor allocate`) --------------------------------------------------


# ---- the spectral edit table (`lora-monitor edit`) -------------------------------------------------------
