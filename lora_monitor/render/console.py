"""Every table lora-monitor prints, drawn with rich: one function per table, no computation of its own."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

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


_ALLOCATION_COLUMNS = (
    "layer",
    "shape",
    "α",
    "spikes",
    "λ+ (TW)",
    "stable rank",
    "‖W‖₂",
    "score",
    "rank",
    "alpha",
)


def print_allocation(allocation: Any, *, model: str, fit: str) -> None:
    """The per-layer spectra, scores and ranks of a :class:`~lora_monitor.allocation.RankAllocation`
    (left-out layers dimmed), the parameter count, and the ``LoraConfig`` arguments as JSON."""
    import json

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Ranks from the weight spectra of {model} ({fit} fit)")
    for column in _ALLOCATION_COLUMNS:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in allocation.layers:
        spectrum = layer.spectrum
        table.add_row(
            spectrum.name,
            f"{spectrum.shape[0]}×{spectrum.shape[1]}",
            f"{spectrum.alpha:.2f}",
            str(spectrum.num_spikes),
            f"{spectrum.edge:.3g}",
            f"{spectrum.stable_rank:.1f}",
            f"{spectrum.spectral_norm:.3g}",
            f"{layer.score:.3f}",
            str(layer.rank) if layer.selected else "-",
            f"{layer.alpha:g}" if layer.selected else "-",
            style=None if layer.selected else "dim",
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    budget = allocation.parameter_budget
    console.print(
        f"{len(allocation.target_modules)} of {len(allocation.layers)} layers adapted, "
        f"{allocation.trainable_parameters} trainable LoRA parameters"
        + (f" (budget {budget})" if budget is not None else "")
    )
    console.print("LoraConfig arguments:")
    console.print_json(json.dumps(allocation.lora_config_kwargs()))


# ---- the spectral edit table (`lora-monitor edit`) -------------------------------------------------------


def print_edit(result: Any) -> None:
    """One line for a :class:`~lora_monitor.edit.SpectralEditResult` (modules, mode, folder), then its losses."""
    print(f"edited {len(result.modules)} modules ({result.config.mode}); wrote {result.output_path}")
    for name, value in result.losses.items():
        print(f"  {name:>20}: {value:.4f}")
