"""``lora-monitor report``: PNG plots and one HTML page of what the callbacks recorded in a run."""

from __future__ import annotations

import argparse

from .arguments import _command


def register_report(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "report",
        "PNG plots and a self-contained HTML page of a training run",
        _run_report,
        description="Draw what the callbacks recorded in a training run's output_dir (lora_monitor.jsonl, "
        "squeeze_manifest.json): the singular values of each module's delta, the variance kept per rank, the "
        "effective rank per module at each check and the adapter's dominance over the base; as PNG files "
        "and one report.html that embeds them with the tables.",
    )
    parser.add_argument(
        "run_dir", help="the Trainer's output_dir (lora_monitor.jsonl, squeeze_manifest.json)"
    )
    parser.add_argument("--out", help="folder for the plots and report.html (default: RUN_DIR)")


def _run_report(args: argparse.Namespace) -> int:
    from ..render import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0
