"""``lora-monitor edit``: spectral editing of a trained adapter with calibration gradients."""

from __future__ import annotations

import argparse

from .arguments import _batching_arguments, _command, _integers

# The edit's numeric options (--core-frac etc.); left out, they take EditConfig's defaults.
_EDIT_NUMBERS = ("core_frac", "noise_frac", "amp_factor", "sup_factor", "mid_factor", "eta")
_EDIT_NUMBER_HELP = {
    "core_frac": "fraction of each module's directions amplified (the most sensitive)",
    "noise_frac": "fraction of each module's directions suppressed (the least sensitive)",
    "amp_factor": "factor on the amplified singular values",
    "sup_factor": "factor on the suppressed singular values",
    "mid_factor": "factor on the singular values neither amplified nor suppressed",
    "eta": "step size of --mode gd, relative to the module's largest sensitivity",
}


def register_edit(subparsers: argparse._SubParsersAction) -> None:
    from ..edit.options import EditConfig  # no torch: --help answers at once

    parser = _command(
        subparsers,
        "edit",
        "amplify/suppress singular directions by calibration sensitivity",
        _run_edit,
        description="Spectral editing of a trained adapter: measure how sensitive the loss on calibration "
        "texts is to each singular value of each edited module's delta, then amplify the most sensitive "
        "directions and suppress the least (or take a gradient step on the singular values), at the same "
        "rank and scale. The edited adapter is written to --out; the input is never modified.",
    )
    parser.add_argument("adapter", help="adapter folder to edit (never modified)")
    parser.add_argument("--base", required=True, help="base model folder the adapter was trained on")
    parser.add_argument(
        "--data", required=True, help="calibration texts: .txt (one per line), .jsonl or .json"
    )
    parser.add_argument("--out", required=True, help="folder for the edited adapter")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the base model folder)")
    parser.add_argument(
        "--mode",
        default="abs_select",
        choices=["abs_select", "random_index", "gd"],
        help="abs_select: amplify the most sensitive directions, suppress the least; random_index: the same "
        "counts picked at random (a control); gd: a gradient step on the singular values (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--target-modules",
        default="down_proj,o_proj",
        help="comma-separated module types to edit (default: %(default)s)",
    )
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    for name in _EDIT_NUMBERS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            help=f"{_EDIT_NUMBER_HELP[name]} (default: {EditConfig.__dataclass_fields__[name].default})",
        )
    parser.add_argument(
        "--update",
        default="multiplicative",
        choices=["multiplicative", "additive"],
        help="how --mode gd applies its step: σ·exp(-eta·g) or σ - eta·g·σmax (default: %(default)s)",
    )
    parser.add_argument(
        "--preserve-energy",
        default="l1",
        choices=["l1", "l2", "none"],
        help="rescale the edited singular values to keep their sum (l1) or sum of squares (l2) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of --mode random_index (default: %(default)s)"
    )
    _batching_arguments(parser, samples=32, samples_help="calibration samples", batch_size=2)
    parser.add_argument(
        "--eval", action="store_true", help="report calibration and held-out loss before/after"
    )
    parser.add_argument("--heldout", help="held-out texts for --eval (default: the last 20%% of --data)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")


def _run_edit(args: argparse.Namespace) -> int:
    from ..edit.options import check_batching, edit_config

    # The edit's options (EditConfig's fields), each checked before torch and transformers are imported and
    # the tokenizer and the model loaded (seconds to minutes): a wrong one is answered at once.
    options = {
        "mode": args.mode,
        "update": args.update,
        "seed": args.seed,
        "target_modules": [t for t in args.target_modules.split(",") if t],
        "layers": _integers(args.layers, "--layers") if args.layers else None,
        "preserve_energy": None if args.preserve_energy == "none" else args.preserve_energy,
        **{name: getattr(args, name) for name in _EDIT_NUMBERS if getattr(args, name) is not None},
    }
    edit_config(**options)
    check_batching(args.batch_size, args.max_length, args.samples)
    from ..edit import load_tokenizer, read_texts, spectral_edit
    from ..render.console import print_edit, print_json

    texts = read_texts(args.data)
    heldout = None
    if args.eval:
        if args.heldout:
            heldout = read_texts(args.heldout)
        else:
            cut = max(1, int(len(texts) * 0.8))
            texts, heldout = texts[:cut], texts[cut:] or texts[-1:]
    result = spectral_edit(
        args.adapter,
        texts,
        tokenizer=load_tokenizer(args.tokenizer or args.base, "pass --tokenizer"),
        base_model=args.base,
        output_path=args.out,
        heldout_data=heldout,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_samples=args.samples,
        overwrite=args.overwrite,
        **options,
    )
    if args.json:
        print_json({"output_path": str(result.output_path), **result.to_dict()})
    else:
        print_edit(result)
    return 0
