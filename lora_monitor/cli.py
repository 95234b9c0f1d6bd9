"""The ``lora-monitor`` command.

Each sub-command is a ``register_*`` function that adds its parser and sets ``handler``; the handler gets
the parsed arguments and returns the exit status. A :class:`LoraMonitorError` (bad input) is printed as one
line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import LoraMonitorError

EXIT_BAD_INPUT = 2


def print_json(payload: Any) -> None:
    """Write a JSON document to stdout (the ``--json`` output of every sub-command)."""
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# ---- analyze (SpectralMonitor metrics of a saved adapter) ------------------------------------------------


def register_analyze(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="spectral health metrics of a saved adapter")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_not_yet("analyze"))


# ---- squeeze (Post-Squeeze analysis and compression) -----------------------------------------------------


def register_squeeze(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("squeeze", help="variance table, recommended rank, compressed adapter")
    parser.add_argument("adapter", help="adapter folder, or a TOML file with a [squeeze] table")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_not_yet("squeeze"))


# ---- demo ------------------------------------------------------------------------------------------------


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a tiny model with the callbacks and show what they find"
    )
    parser.add_argument(
        "--out", default="lora-monitor-demo", help="folder for the run (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.out, steps=args.steps)
    return 0


# ----------------------------------------------------------------------------------------------------------


def _not_yet(name: str):
    def handler(args: argparse.Namespace) -> int:
        raise LoraMonitorError(f"'lora-monitor {name}' is not available in this version yet")

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-monitor", description="Watch, squeeze and compress LoRA adapters (PEFT)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_analyze(subparsers)
    register_squeeze(subparsers)
    register_demo(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lora-monitor`` command; returns (and exits with) the status."""
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
    except LoraMonitorError as error:
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        status = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"lora-monitor {args.command}: interrupted", file=sys.stderr)
        status = 130
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
