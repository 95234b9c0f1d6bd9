"""What every sub-command shares: its parser with the -q/-v output options, the verbosity they choose, the
comma-separated whole numbers of --ranks and --layers, and the check of the paths a command reads (adapter
folders, model folders, data files), made before torch and PEFT are imported."""

from __future__ import annotations

import argparse

from .._io import adapter_folder, model_folder
from ..errors import LoraMonitorError, check_path

EXIT_BAD_INPUT = 2


def _command(
    subparsers: argparse._SubParsersAction, name: str, help: str, handler, description: str | None = None
) -> argparse.ArgumentParser:
    """A sub-command's parser, with ``handler`` set to run it and the output options every command has."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(handler=handler)
    output = parser.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the results and errors: no warnings, no progress bars (default: off)",
    )
    output.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print progress bars and the library's debug messages (default: off: warnings, and "
        "progress bars on a terminal)",
    )
    return parser


def _verbosity(args: argparse.Namespace) -> str:
    """``"quiet"``, ``"verbose"`` or ``"normal"``, from the command's -q/-v."""
    return "quiet" if args.quiet else "verbose" if args.verbose else "normal"


def _batching_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    samples: int,
    samples_help: str,
    batch_size: int,
) -> None:
    """--samples, --batch-size and --max-length: how a command that runs the model on texts (squeeze's rank by
    function, edit) reads them; each command checks the three with ``edit.options.check_batching``."""
    parser.add_argument(
        "--samples",
        type=int,
        default=samples,
        help=f"{samples_help}, 0 for every text (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="texts per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="tokens kept of each text, the rest cut off (default: %(default)s)",
    )


def _integers(text: str, option: str) -> list[int]:
    """A comma-separated list of whole numbers (``--ranks``, ``--layers``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise LoraMonitorError(f"{option} takes comma-separated whole numbers, got {text!r}") from error


# The paths each command reads (argument -> what it is: an adapter folder, a model folder, or a file or folder
# named by the text), checked before the command imports torch and PEFT (a second or more): a mistyped path,
# or a folder that does not hold an adapter or a model, is answered at once.
_INPUT_PATHS: dict[str, dict[str, str]] = {
    "analyze": {"adapter": "adapter", "base": "model"},
    "squeeze": {"adapter": "adapter", "base": "model", "data": "data file", "tokenizer": "tokenizer folder"},
    "allocate": {"model": "model"},
    "edit": {
        "adapter": "adapter",
        "base": "model",
        "data": "data file",
        "heldout": "data file",
        "tokenizer": "tokenizer folder",
    },
    "report": {"run_dir": "run folder"},
}


def _check_input_paths(args: argparse.Namespace) -> None:
    for argument, kind in _INPUT_PATHS.get(args.command, {}).items():
        path = getattr(args, argument, None)
        if path is None:
            continue
        if kind == "adapter" and str(path).endswith(".toml"):  # squeeze's settings file
            check_path(path, "TOML file", folder=False)
        elif kind == "adapter":
            adapter_folder(path, getattr(args, "adapter_name", None))
        elif kind == "model":
            model_folder(path, "base model folder" if argument == "base" else "model folder")
        else:
            check_path(path, kind, folder=kind.endswith("folder"))
