"""Step-time overhead of SpectralMonitorCallback in a real Trainer run.

The same small-but-not-trivial run (a 4-layer Llama, hidden 256, LoRA r=16 on every linear layer) is
trained with no callback, with the monitor every 50 steps, with the monitor every step (the gradient rank
at every 10th, the callback's default) and with the gradient rank at every step too. Each step is
timed from one ``on_step_end`` to the next by a callback placed after the monitor, so a step's time
includes the monitor's work at that step (the gradient rank in ``on_pre_optimizer_step``, the metrics,
alerts, JSONL line and log event in ``on_step_end``). The configurations are interleaved and repeated;
the table shows the min and the median over the repeats of each one's mean step, the step ratios to the
run without a callback (min to min, median to median, and the median of each repeat's ratio to the run
without a callback of the same repeat), and the time in the monitor's hooks per check against the median
step. On a shared machine a step ratio moves by several percent with whatever else runs during one run
of 100 steps; the hooks' share of a step is the steady figure.

    python bench/monitor_overhead.py [--steps 100] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lora_monitor.callbacks.monitor import SpectralMonitorCallback


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, callbacks before it in the list included."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now


def working(step: int, block: int) -> bool:
    """Whether the alternating monitor checks at optimizer step ``step``: the blocks are steps 1-9, 10-19,
    20-29, ... (for ``block=10``: aligned with the multiples at which the monitor measures the gradient
    rank), and the first works."""
    return step // block % 2 == 0


class TimedMonitor(SpectralMonitorCallback):
    """The monitor, with the time spent in its per-step hooks added up (the start-of-training check,
    which also caches the base norms once, is kept apart)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0
        self.start_seconds = 0.0
        self.step_checks = 0

    def on_train_begin(self, *args, **kwargs):
        start = time.perf_counter()
        result = super().on_train_begin(*args, **kwargs)
        self.start_seconds += time.perf_counter() - start
        return result

    def on_pre_optimizer_step(self, *args, **kwargs):
        start = time.perf_counter()
        result = super().on_pre_optimizer_step(*args, **kwargs)
        self.hook_seconds += time.perf_counter() - start
        return result

    def on_step_end(self, args, state, control, **kwargs):
        self.step_checks += state.global_step % self.every_n_steps == 0
        start = time.perf_counter()
        result = super().on_step_end(args, state, control, **kwargs)
        self.hook_seconds += time.perf_counter() - start
        return result


class AlternatingMonitor(TimedMonitor):
    """The timed monitor every step of alternate blocks of ``block`` steps, idle in the blocks between."""

    def __init__(self, block: int, **kwargs) -> None:
        super().__init__(every_n_steps=1, **kwargs)
        self.block = block

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if working(state.global_step + 1, self.block):  # the step about to end
            return super().on_pre_optimizer_step(args, state, control, **kwargs)
        return None

    def on_step_end(self, args, state, control, **kwargs):
        if working(state.global_step, self.block):
            return super().on_step_end(args, state, control, **kwargs)
        return None


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(LlamaForCausalLM(config), lora)


def dataset(args: argparse.Namespace) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (args.batch * args.steps, args.seq), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def run(args: argparse.Namespace, monitor: TimedMonitor | None, data: Dataset) -> list[float]:
    """Train once with ``monitor`` (None: no callback); every optimizer step's seconds, in order."""
    timer = StepTimer()
    callbacks = [timer] if monitor is None else [monitor, timer]
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=1e-3,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            log_level="error",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=build_model(args), args=training_args, train_dataset=data, callbacks=callbacks
        )
        # Printing every log event to the console is not what is measured here.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    return timer.step_times


def block_ratios(step_times: list[float], block: int, warmup: int) -> list[float]:
    """Mean step of each working block over that of the resting block after it. Only whole blocks after
    ``warmup`` are paired (the first block, steps 1 to ``block - 1``, never is)."""
    blocks: dict[int, list[float]] = {}
    for step, seconds in enumerate(step_times, start=1):
        blocks.setdefault(step // block, []).append(seconds)
    return [
        statistics.fmean(blocks[index]) / statistics.fmean(blocks[index + 1])
        for index in sorted(blocks)
        if working(index * block, block)
        and index * block > warmup
        and len(blocks[index]) == len(blocks.get(index + 1, ())) == block
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the mean")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--block",
        type=int,
        default=10,
        help="steps per block of the alternating run (10: the gradient rank at the first step of each working "
        "block, one step in ten as in a run with every_n_steps=1)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 steadies timings on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = dataset(args)
    configurations = {
        "no callback": None,
        "monitor every 50 steps": {"every_n_steps": 50},
        "monitor every step": {"every_n_steps": 1},  # the gradient rank every 10 steps (the default)
        "every step, gradient rank too": {"every_n_steps": 1, "gradient_every_n_steps": 1},
    }
    side_by_side = {"monitor every step": {}, "every step, gradient rank too": {"gradient_every_n_steps": 1}}
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in configurations}
    # each run's block ratios and hooks per check, per configuration
    alternating: dict[str, list[tuple[list[float], float]]] = {name: [] for name in side_by_side}
    for _ in range(args.repeats):
        for name, options in configurations.items():
            monitor = None if options is None else TimedMonitor(log_alerts=False, **options)
            mean_step = statistics.fmean(run(args, monitor, data)[args.warmup :])
            runs[name].append(
                (mean_step, 0, 0.0)
                if monitor is None
                else (mean_step, monitor.step_checks, monitor.hook_seconds)
            )
        for name, options in side_by_side.items():
            monitor = AlternatingMonitor(args.block, log_alerts=False, **options)
            ratios = block_ratios(run(args, monitor, data), args.block, args.warmup)
            alternating[name].append((ratios, monitor.hook_seconds / max(monitor.step_checks, 1)))

    def steps(name: str) -> tuple[float, float]:
        """Min and median over the repeats of a configuration's mean step."""
        means = [mean_step for mean_step, _, _ in runs[name]]
        return min(means), statistics.median(means)

    def paired_ratios(name: str) -> list[float]:
        """Each repeat's mean step over the no-callback run of the same repeat (run minutes apart at most)."""
        return [
            mean_step / plain[0]
            for (mean_step, _, _), plain in zip(runs[name], runs["no callback"], strict=True)
        ]

    def per_check(name: str) -> float | None:
        """Median over the repeats of the seconds in the hooks per check."""
        found = [seconds / checks for _, checks, seconds in runs[name] if checks]
        return statistics.median(found) if found else None

    modules = 7 * args.layers
    baseline = steps("no callback")
    table = Table(
        title=f"SpectralMonitorCallback overhead: Llama {args.layers}×{args.hidden}, {modules} LoRA modules "
        f"r={args.rank}, batch {args.batch}×{args.seq}, {args.steps} steps, {torch.get_num_threads()} threads "
        f"({args.repeats} runs of each, interleaved; mean step over steps {args.warmup + 1}-{args.steps})"
    )
    columns = (
        "configuration",
        "checks",
        "mean step ms (min · median)",
        "step ratio (min · median)",
        "paired ratio (median)",
        "hooks ms per check",
        "hooks / step",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name in configurations:
        low, middle = steps(name)
        hooks = per_check(name)
        table.add_row(
            name,
            str(runs[name][0][1]),
            f"{1000 * low:.1f} · {1000 * middle:.1f}",
            f"{low / baseline[0]:.3f} · {middle / baseline[1]:.3f}",
            f"{statistics.median(paired_ratios(name)):.3f}",
            "–" if hooks is None else f"{1000 * hooks:.1f}",
            # against the median step without a callback: the steady figure (a step ratio moves with
            # whatever else the machine does during one run; the time in the hooks is the monitor's own)
            "–" if hooks is None else f"{hooks / baseline[1]:.3f}",
        )
    console = Console(width=160)
    console.print(table)
    for name, results in alternating.items():
        pairs = [ratio for ratios, _ in results for ratio in ratios]
        run_medians = [statistics.median(ratios) for ratios, _ in results if ratios]
        if pairs:
            console.print(
                f"Side by side in one run, {name} (the monitor every step of alternate blocks of {args.block} "
                f"steps, {len(pairs)} pairs of a working block and the resting block after it over "
                f"{args.repeats} runs): step ratio {statistics.median(pairs):.3f} (median of the pairs; per run "
                + " · ".join(f"{median:.3f}" for median in run_medians)
                + f"), hooks {1000 * statistics.median(hooks for _, hooks in results):.1f} ms per check."
            )
    hooks_50 = per_check("monitor every 50 steps")
    if hooks_50 is not None:
        console.print(
            f"Time in the monitor's hooks per check, spread over 50 steps: {100 * hooks_50 / (50 * baseline[1]):.2f}% "
            "of a step (the overhead at every_n_steps=50 without timing noise)."
        )


if __name__ == "__main__":
    main()
