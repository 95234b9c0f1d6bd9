"""The ``lora-monitor`` command.

Each sub-command is a ``register_*`` function that adds its parser and sets ``handler``; the handler gets
the parsed arguments and returns the exit status. A :class:`LoraMonitorError` (bad input) is printed as one
line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._io import adapter_folder, model_folder
from ._output import progress_bars, quiet_third_party, verbosity_of_command
from .errors import LoraMonitorError, check_path

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


# ---- analyze (SpectralMonitor metrics of a saved adapter) ------------------------------------------------


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
    from .adapters import load_adapter
    from .adapters.base_model import base_weights, load_base_model
    from .monitor import Monitor
    from .monitor.intruders import intruder_dimensions
    from .render.console import print_intruders, print_json, print_monitor_analysis

    adapter = load_adapter(args.adapter, args.adapter_name)
    base = base_weights(load_base_model(args.base), adapter.modules, args.base) if args.base else None
    # The same check a training run makes, once: the rules that need a history do not apply.
    record = Monitor(base_weights=base, track_gradients=False).check(adapter, step=0)
    broken = [m.name for m in record.metrics if m.non_finite]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise LoraMonitorError(
            f"{adapter.path}: module {', '.join(broken[:3])}{more} has NaN/Inf values in its LoRA factors; "
            "the adapter is broken (diverged training?), nothing was analysed"
        )
    broken = [m.name for m in record.metrics if m.non_finite_base]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise LoraMonitorError(
            f"{args.base}: the base weight of module {', '.join(broken[:3])}{more} has NaN/Inf values; "
            "the base model is broken, nothing was analysed"
        )
    intruders = intruder_dimensions(adapter.modules, lambda m: base(m.name)) if base else None
    if args.json:
        found = [item.to_dict() for item in intruders] if intruders is not None else None
        print_json({"adapter": str(adapter.path), "base": args.base, **record.to_dict(), "intruders": found})
        return 0
    print_monitor_analysis(adapter.path, record, with_base=bool(args.base))
    if intruders is not None:
        print_intruders(intruders)
    return 0


def _integers(text: str, option: str) -> list[int]:
    """A comma-separated list of whole numbers (``--ranks``, ``--layers``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise LoraMonitorError(f"{option} takes comma-separated whole numbers, got {text!r}") from error


# ---- squeeze (Post-Squeeze analysis and compression) -----------------------------------------------------


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
        "KL to the full adapter per rank, one pass over --data per rank, and the smallest rank within "
        "--tolerance is recommended (and used by --out unless --rank or --per-module is given).",
    )
    function.add_argument("--base", help="base model folder the adapter was trained on (a causal LM)")
    function.add_argument("--data", help="held-out texts: .txt (one per line), .jsonl or .json")
    function.add_argument("--tokenizer", help="tokenizer folder (default: the --base folder)")
    function.add_argument(
        "--tolerance", type=float, default=0.01, help="relative loss increase allowed (default: %(default)s)"
    )
    function.add_argument(
        "--by-module-type", action="store_true", help="also per module type (one pass per type and rank)"
    )
    function.add_argument(
        "--samples", type=int, default=64, help="texts used, 0 for every text (default: %(default)s)"
    )
    function.add_argument(
        "--batch-size", type=int, default=8, help="texts per forward pass (default: %(default)s)"
    )
    function.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="tokens kept of each text, the rest cut off (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _function_advice(args: argparse.Namespace, adapter_path: str, options: Any, analysis: Any) -> Any:
    """The rank-by-function advice for a saved adapter on its base model and held-out texts."""
    from .adapters.base_model import load_onto_base
    from .edit import calibration_batches, load_tokenizer, read_texts
    from .edit.data import check_scored, is_causal_lm
    from .post_squeeze.held_out import recommend_rank_by_function

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
        min_variance_retention=options.min_variance_retention,
        by_module_type=args.by_module_type,
        progress=progress_bars(_verbosity(args)),
        analysis=analysis,
    )


def _run_squeeze(args: argparse.Namespace) -> int:
    import dataclasses

    # Only the options module first (it imports nothing heavy): every option is checked before the engine,
    # torch and the console are imported, so that a wrong option is answered at once.
    from .post_squeeze.options import SqueezeOptions, read_squeeze_toml

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
        from .edit.options import check_batching
        from .post_squeeze.options import validate_tolerance

        validate_tolerance(args.tolerance)
        check_batching(args.batch_size, args.max_length, args.samples)
    if args.adapter.endswith(".toml"):  # the adapter it names, checked as the command line's was
        adapter_folder(settings["adapter_path"], args.adapter_name)

    from .post_squeeze import analyze_adapter, compress_adapter
    from .post_squeeze.options import check_ranks_within
    from .post_squeeze.rank_choice import compression_rank
    from .render.console import print_budget_allocation, print_compression, print_json, print_rank_advice

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
    from .post_squeeze import budget_ranks_by_energy, budget_ranks_by_sensitivity, uniform_budget

    budget = uniform_budget(adapter_path, rank, args.adapter_name)
    if args.allocate == "energy":
        return budget_ranks_by_energy(adapter_path, budget, adapter_name=args.adapter_name, analysis=analysis)
    return budget_ranks_by_sensitivity(
        adapter_path, function, budget, adapter_name=args.adapter_name, analysis=analysis
    )


# ---- allocate (per-layer ranks from base-weight spectra) -------------------------------------------------


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
    from .allocation.options import check_allocation_options

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
    from .adapters.base_model import load_base_model
    from .allocation.allocate import allocate_ranks, spectral_analysis
    from .render.console import print_allocation, print_json

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


# ---- edit (spectral editing with calibration gradients) ---------------------------------------------------

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
    from .edit.options import EditConfig  # no torch: --help answers at once

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
    parser.add_argument(
        "--samples", type=int, default=32, help="calibration samples, 0 for every text (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=2, help="texts per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="tokens kept of each text, the rest cut off (default: %(default)s)",
    )
    parser.add_argument(
        "--eval", action="store_true", help="report calibration and held-out loss before/after"
    )
    parser.add_argument("--heldout", help="held-out texts for --eval (default: the last 20%% of --data)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")


def _run_edit(args: argparse.Namespace) -> int:
    from .edit.options import check_batching, edit_config

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
    from .edit import load_tokenizer, read_texts, spectral_edit
    from .render.console import print_edit, print_json

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


# ---- report and demo -----------------------------------------------------------------------------------


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
    from .render import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


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
    from .callbacks.demo import run_demo

    run_demo(output_dir=args.out, steps=args.steps, verbosity=_verbosity(args))
    return 0


# ----------------------------------------------------------------------------------------------------------


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


# The paths each command reads (argument -> what it is: an adapter folder, a model folder, or a file or folder
# named by the text), checked before the command imports torch and PEFT (a second or more): a mistyped path,
# or a folder that does not hold an adapter or a model, is answered at once.
_INPUT_PATHS: dict[str, dict[str, str]] = {
    "analyze": {"adapter": "adapter", "base": "model"},
    "squeeze": {"adapter": "adapter", "base": "model", "data": "data file"},
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
