"""The command's parser, every sub-command registered, and :func:`main`, which runs the one given."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .._output import quiet_third_party, verbosity_of_command
from ..errors import LoraMonitorError
from .allocate import register_allocate
from .analyze import register_analyze
from .arguments import EXIT_BAD_INPUT, _check_input_paths, _verbosity
from .demo import register_demo
from .edit import register_edit
from .report import register_report
from .squeeze import register_squeeze


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-monitor", description="Watch, squeeze and compress LoRA adapters (PEFT)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_analyze(subparsers)
    register_squeeze(subparsers)
    register_allocate(subparsers)
    register_edit(subparsers)
    register_report(subparsers)
    register_demo(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lora-monitor`` command; returns (and exits with) the status."""
    args = build_parser().parse_args(argv)
    # lora_monitor's import has already silenced the third-party noise of an import (lora_monitor._output).
    try:
        with verbosity_of_command(_verbosity(args)), quiet_third_party():
            _check_input_paths(args)
            status = args.handler(args)
    except LoraMonitorError as error:
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        status = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"lora-monitor {args.command}: interrupted", file=sys.stderr)
        status = 130
    return status
