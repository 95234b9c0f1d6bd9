"""A monitor never stops training: NaN factors, failing outputs, and adapters that do not train, in real Trainer runs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import peft_llama, training_args
from transformers import Trainer, TrainerCallback

from lora_monitor.callbacks.monitor import SpectralMonitorCallback

BROKEN = "model.layers.0.self_attn.v_proj"
FROZEN = "model.layers.1.mlp.up_proj"


def layer(model, name):
    return model.get_submodule(f"base_model.model.{name}")


class WriteNaN(TrainerCallback):
    """Writes NaN into one lora_B at the end of step ``at`` (before the monitor, which runs after it)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                layer(model, BROKEN).lora_B["default"].weight[0, 0] = float("nan")


def run(tmp_path, dataset, monitor, model, steps, callbacks=(), optimizer=None):
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=steps, logging_steps=50),
        train_dataset=dataset,
        callbacks=[*callbacks, monitor],
        optimizers=(optimizer, None),
    )
    trainer.train()
    return trainer


@pytest.mark.slow
def test_a_nan_factor_mid_training_is_recorded_and_alerted_and_training_goes_on(tmp_path, lm_dataset):
    monitor = SpectralMonitorCallback(every_n_steps=2)
    trainer = run(tmp_path, lm_dataset, monitor, peft_llama(init_lora_weights=True), 6, [WriteNaN(at=4)])
    assert trainer.state.global_step == 6  # the run went on to its end

    lines = [json.loads(line) for line in (tmp_path / "lora_monitor.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4, 6]
    at_nan = {module["name"]: module for module in lines[2]["modules"]}
    assert at_nan[BROKEN]["non_finite"] and at_nan[BROKEN]["effective_rank"] is None
    # The other modules of that check are measured as usual.
    assert all(m["effective_rank"] > 0 for name, m in at_nan.items() if name != BROKEN)
    assert lines[2]["scalars"]["lora/num_non_finite_modules"] == 1.0
    alerts = [alert for alert in monitor.alerts if alert.code == "non_finite"]
    assert alerts[0].severity.value == "critical" and alerts[0].step == 4
    assert alerts[0].modules == (BROKEN,) and BROKEN in alerts[0].message and "step 4" in alerts[0].message
    assert lines[2]["alerts"][0]["code"] == "non_finite"  # the first of that check's alerts


def test_a_base_weight_holding_nan_is_recorded_and_alerted_at_the_first_check(tmp_path, lm_dataset):
    model = peft_llama(init_lora_weights=True)
    with torch.no_grad():
        layer(model, BROKEN).base_layer.weight[3, 1] = float("inf")
    monitor = SpectralMonitorCallback(every_n_steps=1)
    trainer = run(tmp_path, lm_dataset, monitor, model, 1)
    assert trainer.state.global_step == 1

    first = json.loads((tmp_path / "lora_monitor.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    modules = {module["name"]: module for module in first["modules"]}
    assert modules[BROKEN]["non_finite_base"] and modules[BROKEN]["dominance"] is None
    # The others are measured against their own base (B = 0 at the start: a zero, finite dominance).
    assert all(m["dominance"] == 0.0 and not m["non_finite_base"] for n, m in modules.items() if n != BROKEN)
    alert = next(alert for alert in monitor.alerts if alert.code == "non_finite")
    assert alert.step == 0 and alert.severity.value == "critical" and alert.modules == (BROKEN,)
    assert "base weight" in alert.message and BROKEN in alert.message


@pytest.mark.slow
def test_an_adapter_half_restored_from_a_sharded_checkpoint_is_alerted_at_the_first_check(
    tmp_path, lm_dataset
):
    from safetensors.torch import load_file, save_file

    monitor = SpectralMonitorCallback(every_n_steps=2, jsonl_name=None)
    model = peft_llama(init_lora_weights=True)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=lm_dataset,
        callbacks=[monitor],
    )
    trainer.train()
    assert not [alert for alert in monitor.alerts if alert.code == "half_restored_adapter"]

    # What an FSDP2 checkpoint saved by the main process of two holds: its own half of each lora_B's rows,
    # the other half zeros.
    adapter_file = tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"
    tensors = load_file(adapter_file)
    for key, tensor in tensors.items():
        if "lora_B" in key:
            assert bool((tensor != 0).any(dim=1).all())  # trained: no row of B is zero
            tensor[tensor.shape[0] // 2 :] = 0
    save_file(tensors, adapter_file, metadata={"format": "pt"})

    resumed_monitor = SpectralMonitorCallback(every_n_steps=2, jsonl_name=None)
    resumed = Trainer(
        model=peft_llama(init_lora_weights=True),
        args=training_args(tmp_path / "resumed", max_steps=4),
        train_dataset=lm_dataset,
        callbacks=[resumed_monitor],
    )
    resumed.train(resume_from_checkpoint=str(adapter_file.parent))
    alert = next(alert for alert in resumed_monitor.alerts if alert.code == "half_restored_adapter")
    assert alert.step == 2 and alert.severity.value == "critical"  # at the resume, before the first step
    assert len(alert.modules) == 14 and set(alert.values.values()) == {0.5}
    assert "50% of its rows" in alert.message and "#4206" in alert.message and "#3772" in alert.message
    # Judging the checkpoint records no check: the first is at step 4, where the uninterrupted run made one.
    assert resumed_monitor.history.steps == [4]


@pytest.mark.slow
def test_a_failing_output_is_logged_once_and_training_goes_on(tmp_path, lm_dataset, caplog):
    (tmp_path / "lora_monitor.jsonl").mkdir(parents=True)  # the JSONL cannot be written: as a full disk
    monitor = SpectralMonitorCallback(every_n_steps=1)
    with caplog.at_level(logging.DEBUG, logger="lora_monitor"):
        trainer = run(tmp_path, lm_dataset, monitor, peft_llama(init_lora_weights=True), 3)
    assert trainer.state.global_step == 3
    failures = [r for r in caplog.records if "failed" in r.getMessage() and r.name == "lora_monitor"]
    assert len(failures) == 4  # steps 0..3, each check's write
    assert [r.levelno for r in failures] == [logging.WARNING] + [logging.DEBUG] * 3
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)  # the traceback
    # The checks themselves went on: their scalars reached the log history.
    steps = [e["step"] for e in trainer.state.log_history if "lora/num_modules" in e]
    assert steps == [0, 1, 2, 3]


def dead_alerts(monitor):
    return [alert for alert in monitor.alerts if alert.code == "dead_adapter"]


def trainable_except(model, name):
    excluded = {id(p) for p in layer(model, name).parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]


@pytest.mark.slow
def test_dead_adapter_when_requires_grad_is_off(tmp_path, lm_dataset):
    model = peft_llama(init_lora_weights=True)  # B = 0 and stays 0 where nothing trains
    for parameter in (
        layer(model, FROZEN).lora_A["default"].weight,
        layer(model, FROZEN).lora_B["default"].weight,
    ):
        parameter.requires_grad_(False)
    monitor = SpectralMonitorCallback(every_n_steps=20, jsonl_name=None, track_gradients=False)
    run(tmp_path, lm_dataset, monitor, model, 21)
    [alert] = dead_alerts(monitor)
    assert alert.severity.value == "critical" and alert.step == 20 and alert.modules == (FROZEN,)
    assert "B is still exactly zero" in alert.message and "requires_grad is off" in alert.message


@pytest.mark.slow
def test_dead_adapter_when_its_learning_rate_is_zero(tmp_path, lm_dataset):
    model = peft_llama()  # non-zero B: the factors exist but must not move
    optimizer = torch.optim.AdamW(
        [
            {"params": trainable_except(model, FROZEN), "lr": 5e-3},
            {"params": [p for p in layer(model, FROZEN).parameters() if p.requires_grad], "lr": 0.0},
        ]
    )
    monitor = SpectralMonitorCallback(every_n_steps=20, jsonl_name=None, track_gradients=False)
    run(tmp_path, lm_dataset, monitor, model, 21, optimizer=optimizer)
    [alert] = dead_alerts(monitor)
    assert alert.modules == (FROZEN,) and alert.step == 20
    assert "unchanged since step 0" in alert.message and "learning rate 0" in alert.message


@pytest.mark.slow
def test_dead_adapter_when_it_is_missing_from_the_optimizer(tmp_path, lm_dataset):
    model = peft_llama()
    optimizer = torch.optim.AdamW(trainable_except(model, FROZEN), lr=5e-3)
    monitor = SpectralMonitorCallback(every_n_steps=20, jsonl_name=None, track_gradients=False)
    run(tmp_path, lm_dataset, monitor, model, 21, optimizer=optimizer)
    [alert] = dead_alerts(monitor)
    assert alert.modules == (FROZEN,) and "not in the optimizer" in alert.message
    # Configurable: with a longer wait the same run raises nothing yet.
    later = SpectralMonitorCallback(every_n_steps=20, thresholds={"dead_adapter_steps": 40}, jsonl_name=None)
    model = peft_llama()
    run(tmp_path, lm_dataset, later, model, 21, optimizer=torch.optim.AdamW(trainable_except(model, FROZEN)))
    assert dead_alerts(later) == []
