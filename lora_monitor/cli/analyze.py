"""``lora-monitor analyze``: the SpectralMonitor metrics of a saved adapter."""

from __future__ import annotations

import argparse

from ..errors import LoraMonitorError, some_of
from .arguments import _command


def register_analyze(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "analyze",
        "spectral health metrics of a saved adapter",
        _run_analyze,
        description="Per-module effective rank, rank utilization, stable rank, condition numbers and norms of "
        "a saved LoRA adapter, their summary, and the alerts that hold for it. With --base, also the "
        "dominance σmax(ΔW)/σmax(W), update scale ‖ΔW‖F/‖W‖F and intruder dimensions against the base weights.",
    )
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument(
        "--base",
        help="base model folder (from_pretrained) for dominance, update scale and intruder dimensions",
    )
    parser.add_argument("--adapter-name", help="which adapter of a multi-adapter folder (sub-folder name)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_analyze(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..adapters.base_model import base_weights, load_base_model
    from ..monitor import Monitor
    from ..monitor.intruders import intruder_dimensions
    from ..render.console import print_intruders, print_json, print_monitor_analysis

    adapter = load_adapter(args.adapter, args.adapter_name)
    base = base_weights(load_base_model(args.base), adapter.modules, args.base) if args.base else None
    # The same check a training run makes, once: the rules that need a history do not apply.
    record = Monitor(base_weights=base, track_gradients=False).check(adapter, step=0)
    broken = [m.name for m in record.metrics if m.non_finite]
    if broken:
        raise LoraMonitorError(
            f"{adapter.path}: module {some_of(broken)} has NaN/Inf values in its LoRA factors; "
            "the adapter is broken (diverged training?), nothing was analysed"
        )
    # A base with NaN/Inf weights never gets here: load_base_model refuses it, naming the parameter.
    try:
        intruders = intruder_dimensions(adapter.modules, lambda m: base(m.name)) if base else None
    except LoraMonitorError as error:  # it names the module; the user needs the adapter too
        raise LoraMonitorError(f"{adapter.path}: {error}") from error
    if args.json:
        found = [item.to_dict() for item in intruders] if intruders is not None else None
        print_json({"adapter": str(adapter.path), "base": args.base, **record.to_dict(), "intruders": found})
        return 0
    print_monitor_analysis(adapter.path, record, with_base=bool(args.base))
    if intruders is not None:
        print_intruders(intruders)
    return 0
