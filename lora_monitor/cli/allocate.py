"""``lora-monitor allocate``: per-layer LoRA ranks from the base model's weight spectra, before training."""

from __future__ import annotations

import argparse

from .arguments import _command


def register_allocate(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "allocate",
        "per-layer LoRA ranks from the base model's weight spectra",
        _run_allocate,
        description="Before training: fit a power law to the singular values of each weight of a base model "
        "(heavy-tailed self-regularization) and give the layers whose spectra say they have the most to "
        "learn a higher LoRA rank. Prints the rank_pattern/alpha_pattern/target_modules to put in a "
        "LoraConfig.",
    )
    parser.add_argument("model", help="base model folder (config.json + weights)")
    parser.add_argument("--min-rank", type=int, default=4, help="smallest rank given (default: %(default)s)")
    parser.add_argument("--max-rank", type=int, default=64, help="largest rank given (default: %(default)s)")
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="fraction of the layers to adapt (default: %(default)s)"
    )
    parser.add_argument(
        "--scaling",
        choices=["linear", "log", "sqrt"],
        default="linear",
        help="rank spacing (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha-factor", type=float, default=2.0, help="lora_alpha = factor × rank (default: %(default)s)"
    )
    parser.add_argument(
        "--fit", choices=["median", "ks"], default="median", help="power-law xmin rule (default: %(default)s)"
    )
    parser.add_argument(
        "--budget", type=int, help="total trainable LoRA parameters to hit (within one rank step)"
    )
    parser.add_argument(
        "--target-modules", help="comma-separated module names to consider (default: all linear)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_allocate(args: argparse.Namespace) -> int:
    from ..allocation.options import check_allocation_options

    # before torch is imported and the model loaded (seconds to minutes): a wrong option is answered at once
    check_allocation_options(
        args.min_rank,
        args.max_rank,
        args.fraction,
        args.alpha_factor,
        args.budget,
        scaling=args.scaling,
        fit=args.fit,
    )
    from ..adapters.base_model import load_base_model
    from ..allocation.allocate import allocate_ranks, spectral_analysis
    from ..render.console import print_allocation, print_json

    model = load_base_model(args.model)
    targets = (
        [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    )
    spectra = spectral_analysis(
        model, target_modules=targets, fit=args.fit, progress=not (args.json or args.quiet)
    )
    allocation = allocate_ranks(
        spectra,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        layer_fraction=args.fraction,
        scaling=args.scaling,
        alpha_factor=args.alpha_factor,
        parameter_budget=args.budget,
    )
    if args.json:
        print_json({"model": args.model, **allocation.as_dict()})
    else:
        print_allocation(allocation, model=args.model, fit=args.fit)
    return 0
