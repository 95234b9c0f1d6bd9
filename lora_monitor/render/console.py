"""Every table lora-monitor prints, drawn with rich: one function per table, no computation of its own."""

from __future__ import annotations

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


# ---- squeeze (Post-Squeeze analysis and compression) -----------------------------------------------------

_SQUEEZE_KEYS = (
    "adapter_path",
    "min_variance_retention",
    "source_rank",
    "target_ranks",
    "output_path",
    "compress_to",
    "device",
)


# ---- the Post-Squeeze retention table (`lora-monitor squeeze`, PostSqueezeCallback) ----------------------


# ---- the rank allocation table (`lora-monitor allocate`) --------------------------------------------------


# ---- the spectral edit table (`lora-monitor edit`) -------------------------------------------------------
