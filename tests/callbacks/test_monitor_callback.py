"""SpectralMonitorCallback in a real Trainer, TRL SFTTrainer and GRPOTrainer, with W&B offline."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_wandb import offline_wandb_history_keys, offline_wandb_summary, run_with_offline_wandb
from tiny_models import SENTENCES, peft_llama, training_args
from transformers import Trainer, TrainerCallback

from lora_monitor import _io
from lora_monitor.adapters import find_lora_modules
from lora_monitor.callbacks.monitor import SpectralMonitorCallback
from lora_monitor.errors import LoraMonitorError
from lora_monitor.monitor.metrics import ModuleMetrics, compute_module_metrics


class RecordingCallback(TrainerCallback):
    """Stands in for a reporting integration: it sits before the monitor, as W&B and TensorBoard do."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append((state.global_step, dict(logs)))


def train(tmp_path, dataset, monitor, steps=4, model=None, extra_callbacks=(), **overrides):
    model = model if model is not None else peft_llama(init_lora_weights=True)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=steps, **overrides),
        train_dataset=dataset,
        callbacks=[*extra_callbacks, monitor],
    )
    trainer.train()
    return trainer


def _refuse_constant(token: str):
    raise AssertionError(f"{token} in a JSONL line: not strict JSON")


def test_a_jsonl_line_is_strict_json_with_the_values_the_standard_library_reads():
    # The JSONL writer goes through orjson; what it does not take (an int beyond 64 bits) through json.
    document = {
        "step": 3,
        "values": [1e-05, -0.0, 0.1, 1e300, 5e-324, math.nan, -math.inf, math.inf],
        "numpy": [np.float64(0.25), np.float32(2.5), np.int64(7)],
        "by_layer": {0: {"x": math.nan}, 1: {"x": 2.0}},
        "names": ("a", "b"),
        "empty": None,
    }
    expected = json.loads(json.dumps(_io.json_safe({**document, "numpy": [0.25, 2.5, 7]}), allow_nan=False))
    fast = _io.dumps(document, indent=None)
    assert fast.endswith("}\n") and fast.count("\n") == 1
    assert json.loads(fast, parse_constant=_refuse_constant) == expected
    huge = {**document, "numpy": [0.25, 2.5, 7], "huge": 2**70}
    slow = _io.dumps(huge, indent=None)  # orjson refuses the int: the standard path, same rules
    assert json.loads(slow, parse_constant=_refuse_constant) == {**expected, "huge": 2**70}
    assert list(json.loads(_io.dumps({"b": 1, "a": 2}, indent=None, sort_keys=True))) == ["a", "b"]


@pytest.mark.slow
def test_trainer_reports_metrics_to_log_history_integrations_and_jsonl(tmp_path, lm_dataset, caplog):
    recorder = RecordingCallback()
    monitor = SpectralMonitorCallback(
        every_n_steps=2, thresholds={"dominance_warning": 0.2}, gradient_every_n_steps=2
    )
    with caplog.at_level(logging.INFO, logger="lora_monitor"):
        trainer = train(tmp_path, lm_dataset, monitor, steps=4, extra_callbacks=[recorder])

    history = trainer.state.log_history
    monitored = [entry for entry in history if "lora/num_modules" in entry]
    assert [entry["step"] for entry in monitored] == [0, 2, 4]
    assert monitored[0]["lora/num_zero_modules"] == 14  # B = 0 at the start: no ranks, no alert
    assert "lora/mean_effective_rank" not in monitored[0]
    for entry in monitored[1:]:
        for key in (
            "mean_effective_rank",
            "min_rank_utilization",
            "max_dominance",
            "max_kappa_A",
            "mean_gradient_effective_rank",
            "attention/mean_rank_utilization",
        ):
            assert math.isfinite(entry[f"lora/{key}"]), key
    # The Trainer's own loss log at a check step is not swallowed by the monitor's log event.
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    # A callback that runs before the monitor (like every reporting integration) received the scalars.
    assert [step for step, logs in recorder.logged if "lora/max_dominance" in logs] == [2, 4]

    latest = {m.name: m for m in monitor.latest}
    final = {m.name: m for m in compute_module_metrics(find_lora_modules(trainer.model))}
    assert latest.keys() == final.keys()
    for name, record in final.items():
        assert latest[name].effective_rank == pytest.approx(record.effective_rank, rel=1e-12)
        assert latest[name].gradient_effective_rank is not None
    assert monitored[-1]["lora/mean_effective_rank"] == pytest.approx(
        sum(m.effective_rank for m in final.values()) / len(final)
    )

    # Strict JSON: NaN/Infinity tokens are refused. The step-0 line has only zero modules (NaN ranks: null).
    text = (tmp_path / "lora_monitor.jsonl").read_text()
    lines = [json.loads(line, parse_constant=_refuse_constant) for line in text.splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert all(record["effective_rank"] is None for record in lines[0]["modules"])
    modules = [ModuleMetrics.from_dict(record) for record in lines[-1]["modules"]]
    assert [m.name for m in modules] == [m.name for m in monitor.latest]
    assert modules[0].kappa_A == pytest.approx(monitor.latest[0].kappa_A)
    assert lines[-1]["summary"]["by_layer"].keys() == {"0", "1"}

    # The low dominance threshold makes alerts fire: they are on the callback, in the JSONL and logged.
    assert monitor.alerts and {a.code for a in monitor.alerts} == {"adapter_dominance"}
    assert sum(len(line["alerts"]) for line in lines) == len(monitor.alerts)
    assert any("adapter_dominance" in record.getMessage() for record in caplog.records)
    assert monitored[-1]["lora/alerts_total"] == len(monitor.alerts)


@pytest.mark.slow
def test_matches_dense_svd_of_the_trained_adapter(tmp_path, lm_dataset):
    monitor = SpectralMonitorCallback(every_n_steps=3)
    trainer = train(tmp_path, lm_dataset, monitor, steps=3)
    module = find_lora_modules(trainer.model)[2]
    record = next(m for m in monitor.latest if m.name == module.name)
    delta = module.scale * module.B.double() @ module.A.double()
    S = torch.linalg.svdvals(delta)[: module.rank]
    p = S / S.sum()
    assert record.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    S_A = torch.linalg.svdvals(module.A.double())
    assert record.kappa_A == pytest.approx(float(S_A[0] / S_A[-1]), rel=1e-9)
    S_W = torch.linalg.svdvals(module.base_weight().double())
    assert record.dominance == pytest.approx(float(S[0] / S_W[0]), rel=2e-2)


@pytest.mark.slow
def test_attach_and_every_n_steps(tmp_path, lm_dataset):
    model = peft_llama(init_lora_weights=True)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=lm_dataset)
    monitor = SpectralMonitorCallback(every_n_steps=2, jsonl_name=None, track_gradients=False).attach(trainer)
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "lora/num_modules" in e]
    assert steps == [0, 2, 4, 5]  # start, every 2 steps, and the end
    assert not (tmp_path / "lora_monitor.jsonl").exists()
    assert all(m.gradient_effective_rank is None for m in monitor.latest)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("every", "gradient_every", "steps", "measured"),
    [
        (1, 5, 12, [5, 10, 12]),  # the multiples of 5, and the last step
        (1, 1, 12, list(range(1, 13))),
        (2, 5, 12, [6, 10, 12]),  # the first check at or after each multiple
        (5, 2, 7, [5, 7]),  # checks further apart than the span: every one, and a last step off the grid
    ],
)
def test_gradient_rank_at_the_first_check_after_each_multiple_and_the_last_step(
    tmp_path, lm_dataset, every, gradient_every, steps, measured
):
    monitor = SpectralMonitorCallback(every_n_steps=every, gradient_every_n_steps=gradient_every)
    trainer = train(tmp_path, lm_dataset, monitor, steps=steps)
    lines = [json.loads(line) for line in (tmp_path / "lora_monitor.jsonl").read_text().splitlines()]
    checked = [0, *range(every, steps + 1, every)]
    assert [line["step"] for line in lines] == (checked if checked[-1] == steps else [*checked, steps])
    with_gradients = [
        line["step"]
        for line in lines
        if any(m["gradient_effective_rank"] is not None for m in line["modules"])
    ]
    assert with_gradients == measured
    for line in lines:  # a check has every module's gradient rank or none
        ranks = [m["gradient_effective_rank"] for m in line["modules"]]
        assert all(rank is None for rank in ranks) or all(0 < rank <= 2 * 8 for rank in ranks)  # r=8
    logged = [e["step"] for e in trainer.state.log_history if "lora/mean_gradient_effective_rank" in e]
    assert logged == measured


def test_every_n_steps_below_one_is_refused():
    from lora_monitor.errors import LoraMonitorError

    for bad in (0, -3):
        with pytest.raises(LoraMonitorError, match=f"every_n_steps must be at least 1, got {bad}"):
            SpectralMonitorCallback(every_n_steps=bad)
        with pytest.raises(LoraMonitorError, match=f"gradient_every_n_steps must be at least 1, got {bad}"):
            SpectralMonitorCallback(gradient_every_n_steps=bad)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_keys(tmp_path, lm_dataset, monkeypatch):
    monitor = SpectralMonitorCallback(every_n_steps=2, thresholds={"dominance_warning": 0.2})
    run_folder = run_with_offline_wandb(
        monkeypatch, tmp_path, lambda: train(tmp_path, lm_dataset, monitor, steps=2, report_to=["wandb"])
    )
    assert len(list(run_folder.glob("run-*.wandb"))) == 1
    # Read back from the finished run's own records (W&B's protobufs), not from the bytes as they are written.
    history = offline_wandb_history_keys(run_folder)
    summary = offline_wandb_summary(run_folder)
    for key in ("train/lora/mean_effective_rank", "train/lora/max_dominance"):
        assert key in history, key
    # A table is logged as a media reference: nested keys under its name.
    assert any(key.startswith("lora/module_metrics/") for key in history), sorted(history)
    # The run summary holds the alert counts the callback raised.
    assert summary["lora/alerts/total"] == len(monitor.alerts) > 0
    counts = {k.removeprefix("lora/alerts/"): v for k, v in summary.items() if k.startswith("lora/alerts/")}
    del counts["total"]
    assert counts == monitor.monitor.alert_counts == {"adapter_dominance/warning": len(monitor.alerts)}
    # The latest per-module table, written as W&B media.
    tables = sorted(run_folder.glob("files/media/table/lora/module_metrics_*.table.json"))
    assert len(tables) == 2  # the checks at steps 0 and 2
    latest_table = max(tables, key=lambda path: int(path.name.split("_")[2]))
    table = json.loads(latest_table.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["name"] for row in rows] == [m.name for m in monitor.latest]
    assert rows[0]["effective_rank"] == pytest.approx(monitor.latest[0].effective_rank)
    assert rows[0]["dominance"] == pytest.approx(monitor.latest[0].dominance)


@pytest.fixture()
def trl_args(tmp_path):
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=5e-3,
        # TRL before 1.0 defaults to bf16 autocast, which then stays on in Accelerate's process-wide state
        # and reaches the later tests' Trainers: these runs are fp32, as every other test's.
        bf16=False,
    )


@pytest.mark.slow
def test_trl_sft_trainer(tokenizer, trl_args):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    monitor = SpectralMonitorCallback(every_n_steps=1)
    trainer = SFTTrainer(
        model=peft_llama(init_lora_weights=True),
        args=SFTConfig(per_device_train_batch_size=4, max_length=16, **trl_args),
        train_dataset=Dataset.from_dict({"text": SENTENCES}),
        processing_class=tokenizer,
        callbacks=[monitor],
    )
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in history if "lora/mean_effective_rank" in e] == [1, 2]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert len(monitor.latest) == 14 and not any(m.is_zero for m in monitor.latest)


@pytest.mark.slow
def test_trl_grpo_trainer(tokenizer, trl_args):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward_length(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    monitor = SpectralMonitorCallback(every_n_steps=1)
    trainer = GRPOTrainer(
        model=peft_llama(init_lora_weights=True),
        args=GRPOConfig(
            per_device_train_batch_size=2, num_generations=2, max_completion_length=4, **trl_args
        ),
        train_dataset=Dataset.from_dict({"prompt": SENTENCES[:8]}),
        processing_class=tokenizer,
        reward_funcs=reward_length,
        callbacks=[monitor],
    )
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in history if "lora/mean_effective_rank" in e] == [1, 2]
    # GRPO's own metrics still reach their regular log (the monitor does not call trainer.log).
    assert [e["step"] for e in history if "reward" in e] == [1, 2]
    assert all(not m.is_zero and m.dominance is not None for m in monitor.latest)


@pytest.mark.slow
def test_a_callback_reused_by_a_second_trainer_reports_to_that_trainer(tmp_path, lm_dataset):
    monitor = SpectralMonitorCallback(every_n_steps=1, jsonl_name=None)
    first = train(tmp_path / "first", lm_dataset, monitor, steps=1)
    recorder = RecordingCallback()
    second = train(tmp_path / "second", lm_dataset, monitor, steps=1, extra_callbacks=[recorder])
    assert monitor._handler is second.callback_handler is not first.callback_handler
    assert [step for step, logs in recorder.logged if "lora/num_modules" in logs] == [0, 1]
    assert monitor.history.steps == [0, 1]  # the second run starts a history of its own


class _Crash(TrainerCallback):
    """Stops training once at ``step`` the way a killed job does: after checkpoints and checks were written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.step = None
            raise KeyboardInterrupt("stopped")


def _monitored_trainer(output_dir, dataset, crash_at=None, **monitor_options):
    monitor = SpectralMonitorCallback(
        **{"every_n_steps": 3, "thresholds": {"saturation_checks": 2}} | monitor_options
    )
    extra = [_Crash(crash_at)] if crash_at else []
    return Trainer(
        model=peft_llama(init_lora_weights=True, r=8, lora_alpha=16),
        args=training_args(
            output_dir, max_steps=9, save_strategy="steps", save_steps=4, per_device_train_batch_size=2
        ),
        train_dataset=dataset,
        callbacks=[monitor, *extra],
    ), monitor


def _outcome(trainer, monitor, resume_from=None):
    with contextlib.suppress(KeyboardInterrupt):  # the stop _Crash stands for
        trainer.train(resume_from_checkpoint=resume_from)
    logged = [entry for entry in trainer.state.log_history if "lora/num_modules" in entry]
    alerts = [(a.code, a.severity, a.step, a.modules) for a in monitor.alerts]
    rows = _io.read_json_lines(Path(trainer.args.output_dir) / "lora_monitor.jsonl")
    return rows, logged, alerts, monitor.history.steps


def _monitored_run(output_dir, dataset, crash_at=None, resume_from=None):
    return _outcome(*_monitored_trainer(output_dir, dataset, crash_at), resume_from=resume_from)


@pytest.mark.slow
def test_a_resumed_run_logs_checks_and_alerts_as_the_uninterrupted_run(tmp_path, lm_dataset):
    whole = _monitored_run(tmp_path / "whole", lm_dataset)
    # Stopped at step 7, after the check at 6 and the checkpoint at 4; resumed by a new callback.
    stopped = _monitored_run(tmp_path / "stopped", lm_dataset, crash_at=7)
    assert [row["step"] for row in stopped[0]] == [0, 3, 6]
    resumed = _monitored_run(
        tmp_path / "stopped", lm_dataset, resume_from=tmp_path / "stopped" / "checkpoint-4"
    )
    rows, logged, alerts, steps = resumed
    # The checks at 0 and 3 are kept, the one at 6 (after the checkpoint) dropped and made again; no check
    # at the resume step 4, which the uninterrupted run did not make.
    assert [row["step"] for row in rows] == [row["step"] for row in whole[0]] == [0, 3, 6, 9]
    assert rows == whole[0]  # every metric, scalar, dynamic and new alert of every check
    assert logged == whole[1]
    assert steps == whole[3] == [0, 3, 6, 9]
    # The alerts raised before the checkpoint come back from the log, not raised a second time; the trends
    # (rank_saturated needs 2 checks of history) fire at the same steps.
    assert alerts == whole[2] and any(code == "rank_saturated" for code, *_ in alerts)


@pytest.mark.slow
def test_a_new_run_into_the_same_output_dir_starts_its_log_anew(tmp_path, lm_dataset):
    first = _monitored_run(tmp_path / "run", lm_dataset)
    second = _monitored_run(tmp_path / "run", lm_dataset)
    assert [row["step"] for row in second[0]] == [0, 3, 6, 9] and second[0] == first[0]


@pytest.mark.slow
def test_a_resume_in_the_same_trainer_over_a_log_with_a_torn_line_and_an_older_run(tmp_path, lm_dataset):
    whole = _monitored_run(tmp_path / "whole", lm_dataset)
    # The notebook case: the same Trainer and callback resumed after the stop. The log also holds what an
    # older version left: an earlier run's lines before this run's, and a line the stop cut short.
    trainer, monitor = _monitored_trainer(tmp_path / "stopped", lm_dataset, crash_at=7)
    _outcome(trainer, monitor)
    log = tmp_path / "stopped" / "lora_monitor.jsonl"
    earlier = "".join(_io.dumps(row, indent=None) for row in whole[0])
    log.write_text(earlier + log.read_text() + '{"step": 9, "summ')
    rows, logged, alerts, steps = _outcome(trainer, monitor, tmp_path / "stopped" / "checkpoint-4")
    assert rows == whole[0] and steps == whole[3] == [0, 3, 6, 9]
    assert alerts == whole[2] and logged == whole[1]


@pytest.mark.slow
def test_a_factor_that_never_moved_is_still_found_after_a_resume(tmp_path, lm_dataset):
    # One pair gets no gradient (its factors stay as initialised): dead_adapter after 4 steps, at step 4,
    # whether or not the run was stopped at step 3 and resumed from its checkpoint at 2.
    def run(folder, crash_at=None, resume_from=None):
        model = peft_llama(init_lora_weights=False)
        for name, parameter in model.named_parameters():
            if "layers.0.self_attn.q_proj.lora_" in name:
                parameter.register_hook(torch.zeros_like)
        monitor = SpectralMonitorCallback(every_n_steps=2, thresholds={"dead_adapter_steps": 4})
        trainer = Trainer(
            model=model,
            args=training_args(
                tmp_path / folder, max_steps=6, save_strategy="steps", save_steps=2, weight_decay=0.0
            ),
            train_dataset=lm_dataset,
            callbacks=[monitor, *([_Crash(crash_at)] if crash_at else [])],
        )
        return _outcome(trainer, monitor, resume_from)

    whole = run("whole")
    assert [(code, step) for code, _, step, _ in whole[2] if code == "dead_adapter"] == [("dead_adapter", 4)]
    run("stopped", crash_at=3)
    resumed = run("stopped", resume_from=tmp_path / "stopped" / "checkpoint-2")
    assert resumed[0] == whole[0] and resumed[2] == whole[2]


def test_two_monitors_writing_one_log_are_refused(tmp_path, lm_dataset):
    trainer = Trainer(
        model=peft_llama(init_lora_weights=True),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=lm_dataset,
        callbacks=[SpectralMonitorCallback(), SpectralMonitorCallback(every_n_steps=5)],
    )
    with pytest.raises(LoraMonitorError, match=r"two SpectralMonitorCallbacks write .*lora_monitor\.jsonl"):
        trainer.train()
