"""``lora-monitor demo``: a tiny model trained with the callbacks, offline and on the CPU."""

from __future__ import annotations

import argparse

from .arguments import _command, _verbosity


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "demo",
        "train a tiny model with the callbacks and show what they find",
        _run_demo,
        description="Offline and on the CPU (about a minute on 2 cores): a tiny random Llama with a rank-32 "
        "LoRA trains with the SpectralMonitorCallback and the PostSqueezeCallback, then again with the "
        "InSqueezeCallback. The base model, the adapters, the monitor's records and the report are written "
        "to --out.",
    )
    parser.add_argument(
        "--out", default="lora-monitor-demo", help="folder for the run (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")


def _run_demo(args: argparse.Namespace) -> int:
    from ..callbacks.demo import run_demo

    run_demo(output_dir=args.out, steps=args.steps, verbosity=_verbosity(args))
    return 0
