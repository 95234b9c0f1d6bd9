"""Every table lora-monitor prints, drawn with rich, and the commands' JSON output: one function per table,
no computation of its own."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console
    from rich.table import Table

    from ..monitor.intruders import IntruderDimensions
    from ..post_squeeze.analysis import SqueezeAnalysis
    from ..post_squeeze.held_out import FunctionRecommendation


def print_json(payload: Any) -> None:
    """Write a JSON document to stdout (the ``--json`` output of every ``lora-monitor`` sub-command)."""
    import json
    import sys

    from .._io import json_safe

    # Strict JSON: NaN and infinity (an undefined or infinite κ) are written as null.
    json.dump(json_safe(payload), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")


# ---- the monitor's analysis table (`lora-monitor analyze`) ---------------------------------------------


def print_monitor_analysis(path: object, record: object, *, with_base: bool) -> None:
    """The per-module table, the summary per block and layer, and the alerts of one
    :class:`~lora_monitor.monitor.MonitorRecord` (``lora-monitor analyze``)."""
    # Imported here: this section's imports stay in this section (each table has its own).
    import math
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table

    def number(value, digits: int = 3) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"

    # Piped output gets a wide page rather than rich's 80 columns, so that the table is not squeezed.
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"LoRA adapter {path}", title_justify="left", box=box.SIMPLE_HEAD)
    columns = ["module", "rank", "eff. rank", "util.", "stable", "eff. A", "eff. B", "κ(A)", "κ(B)", "‖ΔW‖F"]
    if with_base:
        columns += ["dominance", "update scale"]
    for column in columns:
        if column == "module":
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column, justify="right")
    for m in record.metrics:
        if m.non_finite:
            row = [m.name, str(m.nominal_rank), "NaN/Inf", *["–"] * (len(columns) - 3)]
        elif m.is_zero:
            row = [m.name, str(m.nominal_rank), "zero ΔW", *["–"] * (len(columns) - 3)]
        else:
            row = [
                m.name,
                str(m.nominal_rank),
                number(m.effective_rank),
                f"{100 * m.rank_utilization:.0f}%",
                number(m.stable_rank),
                number(m.effective_rank_A),
                number(m.effective_rank_B),
                number(m.kappa_A),
                number(m.kappa_B),
                number(m.frobenius),
            ]
            if with_base:
                row += [number(m.dominance), number(m.update_scale)]
        table.add_row(*row)
    console.print(table)

    summary = record.summary
    overview = Table(title="Summary (mean / worst)", title_justify="left", box=box.SIMPLE_HEAD)
    overview.add_column("group")
    shown = ["effective_rank", "rank_utilization", "kappa_A", "kappa_B"] + (
        ["dominance", "update_scale"] if with_base else []
    )
    for metric in shown:
        overview.add_column(metric, justify="right")
    groups = [
        ("all", summary.overall),
        *summary.by_block.items(),
        *((f"layer {k}", v) for k, v in summary.by_layer.items()),
    ]
    for label, group in groups:
        overview.add_row(
            f"{label} ({group.num_modules})",
            *(f"{number(group.metrics[key].mean)} / {number(group.metrics[key].worst)}" for key in shown),
        )
    console.print(overview)
    if not record.new_alerts:
        console.print("No alerts.")
    styles = {"info": "cyan", "warning": "yellow", "critical": "bold red"}
    for alert in record.new_alerts:
        severity = alert.severity.value
        console.print(
            f"{severity.upper()} {alert.code}: {alert.message}", style=styles[severity], markup=False
        )
        console.print(f"  Suggested action: {alert.action}", markup=False)


def print_intruders(intruders: Sequence[IntruderDimensions]) -> None:
    """One line for the whole adapter and the modules with the most intruder dimensions."""
    from rich.console import Console

    if not intruders:
        return
    first = intruders[0]
    total = sum(item.count for item in intruders)
    affected = sorted((item for item in intruders if item.count), key=lambda item: -item.count)
    console = Console()
    console.print(
        f"Intruder dimensions (top {first.top_k} directions of W + ΔW whose best cosine with the base's "
        f"directions is below {first.epsilon:g}): {total} in {len(affected)} of {len(intruders)} modules",
        markup=False,
    )
    for item in affected[:5]:
        console.print(
            f"  {item.name}: {item.count} (lowest similarity {min(item.similarities):.3f})", markup=False
        )


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


def summary_lines(analysis: SqueezeAnalysis, *, checked: bool = False) -> list[str]:
    """The sentences printed under the table: source rank, modules, recommendation, per-group advice.

    Unless a rank checked on held-out data is printed beside it (``checked``), the energy rank is labelled
    an upper bound, with the gap measured on held-out data."""
    from ..post_squeeze.analysis import ENERGY_RANK_CAVEAT

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
    if checked:
        lines.append(f"Energy rank: {analysis.recommended_rank} (mean >= {percent} variance retained)")
    else:
        lines.append(
            f"Energy rank: {analysis.recommended_rank} (mean >= {percent} variance retained), "
            f"{ENERGY_RANK_CAVEAT} (--data, or an eval_dataset in the Trainer)"
        )
    if analysis.recommended_rank_weighted is None:
        lines.append(
            f"Energy-weighted: no rank in {analysis.candidate_ranks} keeps {percent} of the whole adapter"
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


def print_analysis(
    analysis: SqueezeAnalysis, console: Console | None = None, *, checked: bool = False
) -> None:
    """Print the variance table and the recommendation with rich (to stdout unless a Console is given);
    ``checked``: a rank by held-out loss is printed after it (else the energy rank reads as an upper bound)."""
    from rich.console import Console

    console = console or Console()
    console.print(squeeze_table(analysis))
    for line in summary_lines(analysis, checked=checked):  # soft_wrap: a long line stays one line to copy
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def print_function_recommendation(advice: FunctionRecommendation, console: Console | None = None) -> None:
    """The held-out loss, KL and retained energy at each rank, and the energy and function advice side by
    side: for the whole adapter and, when measured, per module type."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"Rank by function: held-out loss {advice.full_loss:.4f} at full rank", title_justify="left"
    )
    # The criterion's own column: the share kept (the default rule) or the relative increase (a tolerance).
    by_share = advice.rule == "retention"
    for column in ("Rank", "Loss", "Δ loss ± SE", "Kept" if by_share else "Δ loss", "KL (nats)", "Mean Var%"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("", justify="left")
    for rank in advice.ranks:
        evaluation = advice.evaluations[rank]
        chosen = rank == advice.recommended_rank
        error = "" if math.isnan(evaluation.increase_se) else f" ±{evaluation.increase_se:.4f}"
        table.add_row(
            str(rank),
            f"{evaluation.loss:.4f}",
            f"{evaluation.loss_increase:+.4f}{error}",
            _percent(evaluation.loss_retention)
            if by_share
            else f"{100 * evaluation.relative_increase:+.2f}%",
            f"{evaluation.kl:.2e}",
            _percent(advice.retained_variance.get(rank, math.nan)),
            "<--" if chosen else "",
            style="bold green" if chosen else None,
        )
    console.print(table)
    if advice.scored_tokens:
        # one-token texts of a causal LM have nothing to predict: they are not in the loss, and say so
        left_out = (
            f"; {advice.unscored_texts} text(s) with no scored token left out"
            if advice.unscored_texts
            else ""
        )
        console.print(
            f"Losses over {advice.scored_tokens} scored tokens in {advice.scored_rows} rows{left_out}; SE: "
            "standard error of the per-row loss differences; Kept: share of what the directions beyond the "
            "first bring, (loss(1) - loss) / (loss(1) - full loss)",
            soft_wrap=True,
        )
    if math.isfinite(advice.base_loss):
        console.print(
            f"Without the adapter (every LoRA pair zeroed) the loss is {advice.base_loss:.4f}: the adapter gains "
            f"{advice.adapter_gain:+.4f} ± {advice.adapter_gain_se:.4f}",
            soft_wrap=True,
        )
    energy = f"{100 * advice.min_variance_retention:g}%"
    function = (
        f"by function (≥ {100 * advice.min_loss_retention:g}% kept)"
        if advice.rule == "retention"
        else f"by function (≤ {100 * advice.tolerance:g}% more loss)"
    )
    sides = Table(title="Recommended rank", title_justify="left")
    for column in ("", f"by energy (≥ {energy} kept)", function):
        sides.add_column(column, justify="left" if not column else "right")
    sides.add_row("whole adapter", str(advice.energy_recommended_rank or "—"), str(advice.recommended_rank))
    for kind, rank in advice.type_recommended_ranks.items():
        sides.add_row(kind, str(advice.energy_type_ranks.get(kind) or "—"), str(rank))
    console.print(sides)


def print_rank_advice(
    analysis: SqueezeAnalysis, function: FunctionRecommendation | None = None, console: Console | None = None
) -> None:
    """The variance table and, when the rank by function was measured, its table after it: what the command
    and ``PostSqueezeCallback`` print about the rank to deploy."""
    print_analysis(analysis, console, checked=function is not None)
    if function is not None:
        print_function_recommendation(function, console)


def print_compression(result: Any) -> None:
    """One line for a :class:`~lora_monitor.post_squeeze.CompressionResult`: the folder, how many modules were
    compressed, and to which rank(s)."""
    changed = sum(result.ranks[name] < result.source_ranks[name] for name in result.ranks)
    new_ranks = sorted(set(result.ranks.values()))
    print(
        f"Wrote {result.output_path}: {changed} of {len(result.ranks)} modules compressed, "
        f"rank{'s' if len(new_ranks) > 1 else ''} {', '.join(map(str, new_ranks))}"
    )


def print_budget_allocation(allocation: Any, uniform_rank: int) -> None:
    """One line for a :class:`~lora_monitor.post_squeeze.BudgetRanks`: how the budget of a uniform rank was
    spent, what it keeps, and the rank of each module type (mean where modules of a type differ)."""
    by_type: dict[str, list[int]] = {}
    for name, rank in allocation.module_ranks.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    ranks = ", ".join(
        f"{kind} {ranks[0]}"
        if len(set(ranks)) == 1
        else f"{kind} {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"
        for kind, ranks in sorted(by_type.items())
    )
    loss = allocation.predicted_loss_increase
    print(
        f"Allocated by {allocation.method}: {allocation.parameters:,} of {allocation.budget:,} LoRA parameters "
        f"(the budget of rank {uniform_rank} everywhere), {100 * allocation.retained:.1f}% of ‖ΔW‖² kept"
        + (f", summed loss increase of the types {loss:+.4f}" if loss is not None else "")
        + f"; ranks: {ranks}"
    )


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
