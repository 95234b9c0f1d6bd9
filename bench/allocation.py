"""Benchmark: lora_monitor's spectral analysis against WeightWatcher's ``analyze`` on the same model's layers.

    python bench/allocation.py [--hidden 512] [--layers 4] [--repeats 2] [--threads 1] [--device cuda]

On a shared machine, run it with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 and --threads 1: with more runnable
threads than cores, a threaded LAPACK call can be many times slower than a single-threaded one.

Builds a Llama from a config (random weights; no download): hidden 512, intermediate 1376, 4 layers, vocab
2000, so 4×7 projections plus the embeddings and lm_head. Both sides analyse the same 30 weights with the
same rules: eigenvalues of WᵀW, power-law α with xmin by KS scan, the Marchenko-Pastur fit and its spikes.
WeightWatcher runs once with ``analyze(mp_fit=True)`` (needs ``pip install weightwatcher``); ours is timed as
a whole and split into its dense SVDs and its fits, in float64 (WeightWatcher's precision) and float32,
plus the median-rule fit. The last lines check that both give the same α and spike counts.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from lora_monitor.allocation import spectral_analysis
from lora_monitor.spectrum import weight_singular_values


def best_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (allocator, thread pool, lazy imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def build_model(hidden: int, layers: int, intermediate: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--device", default=None, help="where our SVDs run (default: cuda if available, else cpu)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(110, Console().width))
    model = build_model(args.hidden, args.layers, args.intermediate, args.vocab)
    weights = [
        module.weight.detach()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding)
    ]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, our SVDs on {device}; "
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}: "
        f"{len(weights)} weight matrices"
    )

    import weightwatcher

    watcher = weightwatcher.WeightWatcher(model=model, log_level=logging.ERROR)
    start = time.perf_counter()
    details = watcher.analyze(mp_fit=True)
    ww_seconds = time.perf_counter() - start

    def ours(fit: str, dtype: torch.dtype):
        return lambda: spectral_analysis(
            model, fit=fit, include_embeddings=True, device=device, dtype=dtype, progress=False
        )

    rows = []
    ks64_seconds, ks64 = best_time(ours("ks", torch.float64), args.repeats)
    svd64_seconds, _ = best_time(
        lambda: weight_singular_values(weights, device=device, dtype=torch.float64), args.repeats
    )
    rows.append(("lora_monitor spectral_analysis, KS fit, float64", ks64_seconds))
    rows.append(("  of which dense SVDs (weight_singular_values)", svd64_seconds))
    rows.append(("  of which α + MP fits", ks64_seconds - svd64_seconds))
    median_seconds, _ = best_time(ours("median", torch.float64), args.repeats)
    rows.append(("lora_monitor spectral_analysis, median fit, float64", median_seconds))
    ks32_seconds, _ = best_time(ours("ks", torch.float32), args.repeats)
    rows.append(("lora_monitor spectral_analysis, KS fit, float32", ks32_seconds))

    table = Table(title="Spectral analysis of the same weights (one run, best of repeats for ours)")
    table.add_column("method")
    table.add_column("seconds", justify="right")
    table.add_column("WeightWatcher / this", justify="right")
    table.add_row("WeightWatcher 0.7.7 analyze(mp_fit=True)", f"{ww_seconds:.2f}", "1.0×")
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.3f}", f"{ww_seconds / seconds:.1f}×" if seconds > 0 else "-")
    console.print(table)

    by_name = {str(row.longname): row for _, row in details.iterrows()}
    pairs = [(layer, by_name[layer.name]) for layer in ks64 if layer.name in by_name]
    alpha_gap = max(abs(layer.alpha - row.alpha) for layer, row in pairs)
    same_spikes = sum(layer.num_spikes == int(row.num_spikes) for layer, row in pairs)
    console.print(
        f"agreement on {len(pairs)} layers: max |Δα| = {alpha_gap:.2e}, "
        f"spike counts identical on {same_spikes}/{len(pairs)}"
    )


if __name__ == "__main__":
    main()
