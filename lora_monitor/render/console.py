"""Every table lora-monitor prints, drawn with rich: one function per table, no computation of its own."""

from __future__ import annotations

from typing import Any

# ---- the monitor's analysis table (`lora-monitor analyze`) ---------------------------------------------


# ---- the Post-Squeeze retention table (`lora-monitor squeeze`, PostSqueezeCallback) ----------------------


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
