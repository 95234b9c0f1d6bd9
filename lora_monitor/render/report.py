"""Pictures of a run: PNG plots and one self-contained HTML page, from what the callbacks wrote.

A run folder (the Trainer's ``output_dir``) holds ``lora_monitor.jsonl`` (one line per monitor check, from
:class:`~lora_monitor.callbacks.SpectralMonitorCallback`) and/or ``squeeze_manifest.json`` (or a
``"squeeze"`` entry in ``manifest.json``, from :class:`~lora_monitor.callbacks.PostSqueezeCallback` or
``lora-monitor squeeze --json``). :func:`write_report` draws what is there:

- ``spectra.png``: the singular values of every module's ΔW (from the squeeze analysis);
- ``retention.png``: the share of ΔW's energy kept at each rank, mean/min/max over modules;
- ``effective_rank_heatmap.png``: effective rank per module (rows) at each check (columns), the checks
  where every B is still zero (step 0) left out and named under the axis;
- ``dominance.png``: σmax(ΔW)/σmax(W) per module at the last check, with the 0.3 and 0.5 lines;

and ``report.html`` with the plots embedded (base64) and the tables, readable offline as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import (
    MANIFEST_NAME,
    MONITOR_FILE,
    REPORT_NAME,
    SQUEEZE_FILES,
    _unwritable,
    atomic_write_text,
    read_json_lines,
    read_text,
)
from ..errors import LoraMonitorError, check_path

_TYPE_COLORS = {
    "q_proj": "#1f77b4",
    "k_proj": "#ff7f0e",
    "v_proj": "#2ca02c",
    "o_proj": "#d62728",
    "gate_proj": "#9467bd",
    "up_proj": "#8c564b",
    "down_proj": "#e377c2",
}


def load_monitor_records(run_dir: Path) -> list[dict[str, Any]]:
    """The monitor's checks, in order (empty when the run had no monitor)."""
    path = run_dir / MONITOR_FILE
    if not path.is_file():
        return []
    return read_json_lines(path, "a monitor record (a JSON object with a step)", required="step")


def load_squeeze_analysis(run_dir: Path) -> dict[str, Any] | None:
    """The Post-Squeeze analysis of the run, if one was written."""
    for name in SQUEEZE_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            document = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise LoraMonitorError(f"{path}: not valid JSON ({error})") from error
        if name == MANIFEST_NAME:
            document = document.get("squeeze") if isinstance(document, dict) else None
        if isinstance(document, dict) and "mean_variance" in document:
            return document
    return None


def _color(module_type: str) -> str:
    return _TYPE_COLORS.get(module_type, "#7f7f7f")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise LoraMonitorError(
            "drawing the report needs matplotlib: pip install 'lora-monitor[plot]'"
        ) from error

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(analysis: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    seen = set()
    for module in analysis.get("modules", []):
        values = [v for v in module.get("singular_values") or [] if v and v > 0]
        if not values:
            continue
        label = module["module_type"] if module["module_type"] not in seen else None
        seen.add(module["module_type"])
        axes.plot(
            range(1, len(values) + 1), values, color=_color(module["module_type"]), alpha=0.7, label=label
        )
    axes.set_yscale("log")
    axes.set_xlabel("index k")
    axes.set_ylabel("σ_k of s·B·A")
    axes.set_title("Singular values of each module's ΔW")
    if seen:
        axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _has_retention(analysis: dict[str, Any]) -> bool:
    """False for an adapter whose every delta is zero (nothing retained or lost: the values are null)."""
    return any(value is not None for value in analysis.get("mean_variance", {}).values())


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def plot_retention(analysis: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    ranks = sorted(int(rank) for rank in analysis["mean_variance"])

    def series(key: str) -> list[float]:
        return [
            math.nan if analysis[key][str(rank)] is None else 100 * analysis[key][str(rank)] for rank in ranks
        ]

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for module in analysis.get("modules", []):
        retained = module.get("retained") or {}
        points = [(int(r), 100 * v) for r, v in retained.items() if v is not None]
        if points:
            points.sort()
            axes.plot(
                *zip(*points, strict=True), color=_color(module["module_type"]), alpha=0.15, linewidth=0.8
            )
    axes.fill_between(ranks, series("min_variance"), series("max_variance"), alpha=0.2, label="min–max")
    axes.plot(ranks, series("mean_variance"), marker="o", label="mean over modules")
    threshold = 100 * analysis.get("min_variance_retention", 0.95)
    axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.0f}%")
    recommended = analysis.get("recommended_rank")
    if recommended:
        axes.axvline(recommended, color="#d62728", linewidth=1, label=f"recommended rank {recommended}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ranks, [str(r) for r in ranks])
    axes.set_xlabel("rank kept")
    axes.set_ylabel("energy of ΔW retained (%)")
    axes.set_title("Variance retained per rank")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@dataclass
class EffectiveRankGrid:
    """What the effective-rank heat map draws: ``values[i][j]`` is module ``names[i]`` at check ``steps[j]``
    (NaN where that check has no value for it). ``left_out_steps``: the checks where no module has an
    effective rank yet (every B still zero, as at step 0 with PEFT's default init), which would be blank
    columns."""

    names: list[str]
    steps: list[int]
    values: list[list[float]]
    left_out_steps: list[int]


def effective_rank_grid(records: list[dict[str, Any]]) -> EffectiveRankGrid | None:
    """The heat map's data from the monitor's checks; None when no check has an effective rank to show."""
    checks = [r for r in records if r.get("modules")]
    if not checks:
        return None
    names = [m["name"] for m in checks[-1]["modules"]]
    columns, steps, left_out = [], [], []
    for record in checks:
        by_name = {m["name"]: m.get("effective_rank") for m in record["modules"]}
        column = [math.nan if by_name.get(name) is None else by_name[name] for name in names]
        if all(math.isnan(value) for value in column):
            left_out.append(record["step"])
            continue
        columns.append(column)
        steps.append(record["step"])
    if not columns:
        return None
    values = [[column[row] for column in columns] for row in range(len(names))]
    return EffectiveRankGrid(names, steps, values, left_out)


def plot_effective_rank_heatmap(records: list[dict[str, Any]], path: Path) -> Path | None:
    grid = effective_rank_grid(records)
    if grid is None:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, max(3.0, 0.28 * len(grid.names) + 1.5)))
    image = axes.imshow(grid.values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(grid.steps)), [str(s) for s in grid.steps], fontsize=7)
    axes.set_yticks(range(len(grid.names)), [_short(n) for n in grid.names], fontsize=7)
    label = "training step"
    if grid.left_out_steps:
        shown = ", ".join(str(step) for step in grid.left_out_steps[:3])
        more = ", ..." if len(grid.left_out_steps) > 3 else ""
        label += f" (not shown: step {shown}{more}, where every B is still zero and ΔW = 0)"
    axes.set_xlabel(label, fontsize=8)
    axes.set_title("Effective rank of ΔW per module over training")
    figure.colorbar(image, ax=axes, label="effective rank")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_dominance(records: list[dict[str, Any]], path: Path) -> Path | None:
    last = next((r for r in reversed(records) if r.get("modules")), None)
    if last is None:
        return None
    modules = [m for m in last["modules"] if m.get("dominance") is not None]
    if not modules:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, max(3.0, 0.28 * len(modules) + 1.5)))
    positions = range(len(modules))
    axes.barh(positions, [m["dominance"] for m in modules], color=[_color(m["module_type"]) for m in modules])
    axes.set_yticks(positions, [_short(m["name"]) for m in modules], fontsize=7)
    axes.invert_yaxis()
    axes.axvline(0.3, color="orange", linestyle="--", linewidth=1, label="0.3 warning")
    axes.axvline(0.5, color="red", linestyle="--", linewidth=1, label="0.5 critical")
    axes.set_xlabel("σmax(s·B·A) / σmax(W_base)")
    axes.set_title(f"Dominance of the adapter over its base (step {last['step']})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _embed(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_report(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Draw the run's plots and write ``report.html`` (self-contained) into ``output_dir`` (default: run_dir).

    Returns the path of the HTML page. Raises :class:`LoraMonitorError` when the folder holds neither a
    monitor file nor a squeeze analysis.
    """
    run = check_path(run_dir, "run folder", folder=True)
    records = load_monitor_records(run)
    analysis = load_squeeze_analysis(run)
    if not records and analysis is None:
        raise LoraMonitorError(
            f"{run}: holds neither {MONITOR_FILE} nor a squeeze analysis ({' / '.join(SQUEEZE_FILES)}); "
            "run training with SpectralMonitorCallback or PostSqueezeCallback first"
        )
    output = Path(output_dir) if output_dir is not None else run
    if output.exists() and not output.is_dir():
        raise LoraMonitorError(f"{output}: is a file, not a folder for the report; nothing was written")
    # Drawn in a staging folder first: a record the report cannot read stops it before any file of it is
    # written, so an output folder never holds half a report.
    with tempfile.TemporaryDirectory(prefix="lora-monitor-report-") as staging:
        try:
            figures, page = _draw_report(run, records, analysis, Path(staging))
        except LoraMonitorError:  # its own message (matplotlib missing), not a field of the run's files
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            sources = " and ".join(
                f for f in (MONITOR_FILE if records else "", "the squeeze analysis" if analysis else "") if f
            )
            raise LoraMonitorError(
                f"{run}: the report cannot read a field of {sources} ({type(error).__name__}: {error}); "
                "nothing was written"
            ) from error
        try:
            output.mkdir(parents=True, exist_ok=True)
            for figure in figures:
                shutil.copyfile(figure, output / figure.name)
        except OSError as error:
            raise _unwritable(output, error) from error
        return atomic_write_text(output / REPORT_NAME, page)  # a reader never sees half a page


def _draw_report(
    run: Path, records: list[dict[str, Any]], analysis: dict[str, Any] | None, output: Path
) -> tuple[list[Path], str]:
    """The plots, drawn into ``output``, and the HTML page that embeds them."""

    figures: list[tuple[Path, str]] = []
    if analysis is not None and _has_retention(analysis):
        figures.append((plot_retention(analysis, output / "retention.png"), "Variance retained per rank"))
        figures.append((plot_spectra(analysis, output / "spectra.png"), "Singular values of each ΔW"))
    heatmap = plot_effective_rank_heatmap(records, output / "effective_rank_heatmap.png")
    if heatmap is not None:
        figures.append((heatmap, "Effective rank per module over training"))
    dominance = plot_dominance(records, output / "dominance.png")
    if dominance is not None:
        figures.append((dominance, "Dominance per module at the last check"))

    sections = [f"<h1>lora-monitor report</h1><p>Run folder: <code>{html.escape(str(run))}</code></p>"]
    if analysis is not None:
        recommended = analysis.get("recommended_rank")
        rows = []
        for rank in sorted(int(r) for r in analysis["mean_variance"]):
            key = str(rank)
            rows.append(
                [
                    rank,
                    _percent(analysis["mean_variance"][key]),
                    _percent(analysis["min_variance"][key]),
                    _percent(analysis["max_variance"][key]),
                    "← recommended" if rank == recommended else "",
                ]
            )
        sections.append(
            f"<h2>Post-Squeeze</h2><p>Source rank {analysis.get('source_rank')}, "
            f"{analysis.get('num_modules', analysis.get('num_layers'))} modules; recommended rank "
            f"<b>{recommended}</b> (mean retention ≥ {100 * analysis.get('min_variance_retention', 0.95):.0f}%).</p>"
            + _table(["rank", "mean", "min", "max", ""], rows)
        )
    if records:
        last = records[-1]
        alerts = [alert for record in records for alert in record.get("alerts") or []]
        sections.append(f"<h2>Monitor</h2><p>{len(records)} checks, last at step {last['step']}.</p>")
        if alerts:
            sections.append(
                "<h3>Alerts</h3>"
                + _table(
                    ["step", "severity", "alert", "message", "suggested action"],
                    [[a.get("step"), a["severity"], a["code"], a["message"], a["action"]] for a in alerts],
                )
            )
        else:
            sections.append("<p>No alerts.</p>")
        modules = last.get("modules") or []
        if modules:
            sections.append(
                "<h3>Modules at the last check</h3>"
                + _table(
                    [
                        "module",
                        "rank",
                        "eff. rank",
                        "utilization",
                        "stable rank",
                        "κ(A)",
                        "κ(B)",
                        "dominance",
                    ],
                    [
                        [
                            m["name"],
                            m.get("nominal_rank"),
                            _number(m.get("effective_rank")),
                            _number(m.get("rank_utilization")),
                            _number(m.get("stable_rank")),
                            _number(m.get("kappa_A")),
                            _number(m.get("kappa_B")),
                            _number(m.get("dominance")),
                        ]
                        for m in modules
                    ],
                )
            )
    sections.append("<h2>Plots</h2>" + "".join(_embed(path, caption) for path, caption in figures))
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>lora-monitor report</title>'
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    return [path for path, _ in figures], page
