"""``lora-monitor squeeze``: Post-Squeeze analysis of a saved adapter, the rank by function, and the
compressed adapter."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._io import adapter_folder
from .._output import progress_bars
from ..errors import LoraMonitorError
from ..post_squeeze.options import DEFAULT_LOSS_RETENTION
from .arguments import _batching_arguments, _command, _integers, _verbosity


def register_squeeze(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "squeeze",
        "variance table, recommended rank, compressed adapter",
        _run_squeeze,
        description="How much of each LoRA delta every rank keeps, the smallest rank keeping the threshold, "
        "and (with --out) the adapter compressed to it. ADAPTER may be a TOML file with a [squeeze] table "
        "(adapter_path and the settings; an unknown key is refused with the list of known ones); options "
        "given on the command line override it.",
    )
    parser.add_argument("adapter", help="adapter folder, or a TOML file with a [squeeze] table")
    parser.add_argument(
        "--threshold", type=float, help="variance to retain, a fraction in (0, 1] (default: 0.95)"
    )
    parser.add_argument(
        "--ranks", help="comma-separated ranks for the table, e.g. 4,8,16 (default: powers of two up to r)"
    )
    parser.add_argument("--out", help="write the compressed adapter to this folder")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, help="compress every module to this rank (default: recommended)")
    choice.add_argument(
        "--per-module", action="store_true", help="give each module the smallest rank reaching the threshold"
    )
    parser.add_argument(
        "--allocate",
        choices=["energy", "sensitivity"],
        help="spend the parameters of --rank (or of the recommended rank) everywhere per module instead: by "
        "energy kept, or by the held-out loss each module type loses (sensitivity: needs --base and --data)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--adapter-name", help="which adapter of a multi-adapter folder (sub-folder name)")
    parser.add_argument("--device", help="torch device for the decomposition (default: cpu)")
    function = parser.add_argument_group(
        "rank by function",
        "With --base and --data, every candidate rank is also tried on the model itself: held-out loss and "
        "KL to the full adapter per rank, one pass over --data per rank, and the smallest rank that keeps 95% "
        "of the loss reduction the directions beyond the first bring is recommended (or, with --tolerance, "
        "the smallest whose loss rises less than that), and used by --out unless --rank or --per-module is "
        "given.",
    )
    function.add_argument("--base", help="base model folder the adapter was trained on (a causal LM)")
    function.add_argument("--data", help="held-out texts: .txt (one per line), .jsonl or .json")
    function.add_argument("--tokenizer", help="tokenizer folder (default: the --base folder)")
    function.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="allow this relative loss increase instead (0.01 = 1%%; default: keep 95%% of what ranks > 1 bring)",
    )
    function.add_argument(
        "--min-loss-retention",
        type=float,
        default=DEFAULT_LOSS_RETENTION,
        help="share of what the directions beyond the first bring to held-out loss that the recommended rank "
        "keeps (default: %(default)s)",
    )
    function.add_argument(
        "--by-module-type", action="store_true", help="also per module type (one pass per type and rank)"
    )
    _batching_arguments(function, samples=64, samples_help="texts used", batch_size=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _function_advice(args: argparse.Namespace, adapter_path: str, options: Any, analysis: Any) -> Any:
    """The rank-by-function advice for a saved adapter on its base model and held-out texts."""
    from ..adapters.base_model import load_onto_base
    from ..edit import calibration_batches, load_tokenizer, read_texts
    from ..edit.data import check_scored, is_causal_lm
    from ..post_squeeze.held_out import recommend_rank_by_function

    if not (args.base and args.data):
        raise LoraMonitorError("--base and --data go together: the base model and the held-out texts")
    texts = read_texts(args.data)
    tokenizer = load_tokenizer(args.tokenizer or args.base, "pass --tokenizer")
    batches = calibration_batches(
        texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length, max_samples=args.samples
    )
    model = load_onto_base(adapter_path, args.base, args.adapter_name, needed_for="--data")
    check_scored(batches, is_causal_lm(model), f"{args.data}")  # the same check, naming the file
    return recommend_rank_by_function(
        model,
        batches,
        ranks=options.candidate_ranks,
        tolerance=args.tolerance,
        min_loss_retention=args.min_loss_retention,
        min_variance_retention=options.min_variance_retention,
        by_module_type=args.by_module_type,
        progress=progress_bars(_verbosity(args)),
        analysis=analysis,
    )


def _run_squeeze(args: argparse.Namespace) -> int:
    import dataclasses

    # Only the options module first (it imports nothing heavy): every option is checked before the engine,
    # torch and the console are imported, so that a wrong option is answered at once.
    from ..post_squeeze.options import SqueezeOptions, read_squeeze_toml

    settings: dict[str, Any] = {"adapter_path": args.adapter}
    where = "lora-monitor squeeze"
    if args.adapter.endswith(".toml"):
        settings = read_squeeze_toml(args.adapter)
        where = f"{args.adapter}: [squeeze]"
    # The TOML table first, then what the command line overrides; one validator for both.
    options = SqueezeOptions.from_mapping(settings, where)
    overrides = {
        "min_variance_retention": args.threshold,
        "candidate_ranks": _integers(args.ranks, "--ranks") if args.ranks is not None else None,
        "target_rank": args.rank,
    }
    if args.per_module:
        overrides.update(per_module=True, target_rank=None)
    elif args.rank is not None:
        overrides["per_module"] = False
    chosen = {key: value for key, value in overrides.items() if value is not None}
    options = dataclasses.replace(options, **chosen, where="" if chosen else options.where)
    output = args.out or settings.get("output_path") or None
    device = args.device or settings.get("device")
    if (args.rank is not None or args.per_module or args.allocate) and not output:
        raise LoraMonitorError(
            "--rank, --per-module and --allocate choose how to compress: give --out DIR as well"
        )
    if args.allocate and options.per_module:
        raise LoraMonitorError("--allocate spends the budget of one rank per module: not with --per-module")
    if args.allocate == "sensitivity":
        if not (args.base and args.data):
            raise LoraMonitorError("--allocate sensitivity measures each module type: give --base and --data")
        args.by_module_type = True
    if args.base or args.data:  # the rank by function's options
        from ..edit.options import check_batching
        from ..post_squeeze.options import validate_threshold, validate_tolerance

        validate_tolerance(args.tolerance)
        validate_threshold(args.min_loss_retention, "--min-loss-retention")
        check_batching(args.batch_size, args.max_length, args.samples)
    if args.adapter.endswith(".toml"):  # the adapter it names, checked as the command line's was
        adapter_folder(settings["adapter_path"], args.adapter_name)

    from ..post_squeeze import analyze_adapter, compress_adapter
    from ..post_squeeze.options import check_ranks_within
    from ..post_squeeze.rank_choice import compression_rank
    from ..render.console import print_budget_allocation, print_compression, print_json, print_rank_advice

    analysis = analyze_adapter(
        settings["adapter_path"],
        min_variance_retention=options.min_variance_retention,
        candidate_ranks=options.candidate_ranks,
        adapter_name=args.adapter_name,
        device=device,
        progress=progress_bars(_verbosity(args)),
    )
    if options.target_rank is not None:  # before the passes of the rank by function and --allocate's budget
        check_ranks_within([options.target_rank], analysis.source_rank, "target_rank", analysis.source)
    source_rank = settings.get("source_rank") or 0
    if source_rank and source_rank != analysis.source_rank and not args.quiet:
        print(
            f"lora-monitor squeeze: warning: source_rank {source_rank} was expected, the weights have rank "
            f"{analysis.source_rank} (the weights are used)",
            file=sys.stderr,
        )
    function = (
        _function_advice(args, settings["adapter_path"], options, analysis)
        if args.base or args.data
        else None
    )
    result = allocation = None
    if output:
        hint = "give --rank to compress anyway, or lower --threshold"
        rank = compression_rank(options, analysis, function, hint=hint)
        if args.allocate:
            allocation = _allocate(args, settings["adapter_path"], rank, function, analysis)
        result = compress_adapter(
            settings["adapter_path"],
            output,
            target_rank=None if allocation else rank,
            min_variance_retention=options.min_variance_retention,
            per_module=options.per_module,
            module_ranks=allocation.module_ranks if allocation else None,
            analysis=analysis,
            adapter_name=args.adapter_name,
            overwrite=args.overwrite,
            device=device,
            progress=progress_bars(_verbosity(args)),
        )
    if args.json:
        print_json(
            {
                "analysis": analysis.to_dict(),
                "function": function.to_dict() if function else None,
                "allocation": allocation.to_dict() if allocation else None,
                "compressed": result.to_dict() if result else None,
            }
        )
        return 0
    print_rank_advice(analysis, function)
    if allocation is not None:
        print_budget_allocation(allocation, rank)
    if result is not None:
        print_compression(result)
    return 0


def _allocate(args: argparse.Namespace, adapter_path: str, rank: int, function: Any, analysis: Any) -> Any:
    """Per-module ranks within the parameters of ``rank`` everywhere (``--allocate``)."""
    from ..post_squeeze import budget_ranks_by_energy, budget_ranks_by_sensitivity, uniform_budget

    budget = uniform_budget(adapter_path, rank, args.adapter_name)
    if args.allocate == "energy":
        return budget_ranks_by_energy(adapter_path, budget, adapter_name=args.adapter_name, analysis=analysis)
    return budget_ranks_by_sensitivity(
        adapter_path, function, budget, adapter_name=args.adapter_name, analysis=analysis
    )
