"""lora_monitor.monitor.Monitor outside the Trainer: a plain PyTorch loop, embedding/lm_head LoRA, analyze."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor.cli import main
from lora_monitor.monitor import Monitor


def dense_effective_rank(S: torch.Tensor) -> float:
    p = S / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lora_layers(model):
    """``name -> PEFT LoraLayer`` read straight from the model (independent of lora_monitor.adapters)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "scaling", {})
    }


@pytest.mark.slow
def test_check_in_a_plain_pytorch_loop_matches_a_dense_svd():
    model = peft_llama(init_lora_weights=True).train()  # B = 0: ΔW grows from zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(3, 120, (4, 12), generator=torch.Generator().manual_seed(0))
    monitor = Monitor()
    records = []
    for step in range(1, 7):
        model(input_ids=ids, labels=ids).loss.backward()
        if step % 3 == 0:
            monitor.record_gradients(model, step)
        optimizer.step()
        optimizer.zero_grad()
        if step % 3 == 0:
            records.append(monitor.check(model, step, epoch=step / 6, optimizer=optimizer))

    assert [record.step for record in records] == monitor.history.steps == [3, 6]
    assert monitor.latest is records[-1]
    layers = lora_layers(model)
    metrics = {m.name: m for m in records[-1].metrics}
    assert metrics.keys() == layers.keys() and len(layers) == 14
    for name, layer in layers.items():
        B, A = (
            layer.lora_B["default"].weight.detach().double(),
            layer.lora_A["default"].weight.detach().double(),
        )
        S = torch.linalg.svdvals(layer.scaling["default"] * B @ A)[: A.shape[0]]
        record = metrics[name]
        assert record.effective_rank == pytest.approx(dense_effective_rank(S), rel=1e-9)
        assert record.sigma_max == pytest.approx(float(S[0]), rel=1e-9)
        S_B = torch.linalg.svdvals(B)
        assert record.kappa_B == pytest.approx(float(S_B[0] / S_B[-1]), rel=1e-6)
        assert record.gradient_effective_rank is not None and record.gradient_effective_rank > 1
        assert record.frozen_reason is None and record.unchanged_since is None  # it trains
    assert records[-1].scalars["lora/mean_effective_rank"] == pytest.approx(
        sum(m.effective_rank for m in metrics.values()) / len(metrics)
    )
    line = json.loads(json.dumps(records[-1].to_dict(), allow_nan=False))
    assert line.keys() == {"step", "epoch", "summary", "scalars", "alerts", "dynamics", "modules"}
    assert line["step"] == 6 and line["epoch"] == 1.0 and len(line["modules"]) == 14


def test_embedding_and_lm_head_count_as_other_not_mlp():
    model = peft_llama(target_modules=["q_proj", "gate_proj", "embed_tokens", "lm_head"])
    record = Monitor().check(model, step=0)
    blocks = {m.name: m.block for m in record.metrics}
    assert blocks["model.embed_tokens"] == blocks["lm_head"] == "other"
    assert blocks["model.layers.0.self_attn.q_proj"] == "attention"
    assert blocks["model.layers.1.mlp.gate_proj"] == "mlp"
    assert not any(m.is_attention for m in record.metrics if m.block != "attention")
    by_block = record.summary.by_block
    assert {key: group.num_modules for key, group in by_block.items()} == {
        "attention": 2,
        "mlp": 2,
        "other": 2,
    }
    other = [m for m in record.metrics if m.block == "other"]
    assert record.scalars["lora/other/mean_effective_rank"] == pytest.approx(
        sum(m.effective_rank for m in other) / 2
    )
    mlp = [m for m in record.metrics if m.block == "mlp"]
    assert record.scalars["lora/mlp/min_rank_utilization"] == min(m.rank_utilization for m in mlp)
    assert record.to_dict()["summary"]["by_block"].keys() == {"attention", "mlp", "other"}


def test_analyze_an_adapter_with_nan_weights_exits_2_naming_the_module(tmp_path, capsys):
    model = peft_llama()
    broken = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        lora_layers(model)[broken].lora_A["default"].weight[0, 3] = float("nan")
    model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "adapter")]) == 2
    error = capsys.readouterr().err
    assert broken in error and "NaN/Inf" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    with torch.no_grad():
        lora_layers(model)[broken].lora_A["default"].weight[0, 3] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    assert main(["analyze", str(tmp_path / "inf"), "--json"]) == 2
    assert broken in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_analyze_with_a_base_weight_holding_nan_exits_2_naming_the_module(tmp_path, capsys, bad_value):
    from tiny_models import tiny_llama

    peft_llama(0).save_pretrained(tmp_path / "adapter")
    base = tiny_llama(0)  # the base peft_llama(0) was built on, with one broken weight
    broken = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        base.get_submodule(broken).weight[2, 5] = bad_value
    base.save_pretrained(tmp_path / "base")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 2
    error = capsys.readouterr().err
    assert f"the base model's {broken}.weight holds NaN or Inf values" in error and "Traceback" not in error
    # One line, besides transformers' own progress bar for loading the base.
    assert len([line for line in error.strip().splitlines() if "Loading weights" not in line]) == 1


@pytest.mark.slow
def test_a_base_weight_holding_nan_is_alerted_and_the_rest_is_measured():
    model = peft_llama(0)
    broken = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        lora_layers(model)[broken].base_layer.weight[0, 0] = float("nan")
    record = Monitor().check(model, 0)
    by_name = {m.name: m for m in record.metrics}
    assert by_name[broken].non_finite_base and not by_name[broken].non_finite
    assert math.isnan(by_name[broken].dominance) and math.isnan(by_name[broken].update_scale)
    assert by_name[broken].effective_rank > 0  # its factors are fine and measured
    for name, metrics in by_name.items():
        if name != broken:  # the others against their own base, by an independent dense SVD
            weight = lora_layers(model)[name].base_layer.weight.double()
            expected = metrics.sigma_max / float(torch.linalg.matrix_norm(weight, ord=2))
            assert not metrics.non_finite_base and metrics.dominance == pytest.approx(expected, rel=0.03)
    alerts = [alert for alert in record.new_alerts if alert.code == "non_finite"]
    assert len(alerts) == 1 and alerts[0].severity.value == "critical" and alerts[0].modules == (broken,)
    assert broken in alerts[0].message and "base weight" in alerts[0].message
    assert json.loads(json.dumps(record.to_dict(json_safe=True)))  # the JSONL line stays strict JSON


def test_factors_that_turn_nan_after_the_base_weight_are_alerted_too():
    # Both rules say "non_finite": the second (the factors) must not be dropped as already raised.
    model = peft_llama(0)
    broken = "model.layers.0.mlp.up_proj"
    monitor = Monitor()
    with torch.no_grad():
        lora_layers(model)[broken].base_layer.weight[0, 0] = float("nan")
    first = [a for a in monitor.check(model, 0).new_alerts if a.code == "non_finite"]
    with torch.no_grad():
        lora_layers(model)[broken].lora_A["default"].weight[0, 0] = float("nan")
    second = [a for a in monitor.check(model, 1).new_alerts if a.code == "non_finite"]
    assert len(first) == 1 and "base weight" in first[0].message
    assert len(second) == 1 and "LoRA factors" in second[0].message and second[0].modules == (broken,)


@pytest.mark.parametrize("mode", ["resize", "mask"])
def test_a_module_squeezed_between_checks_is_read_as_it_is_now(mode):
    """The monitor keeps its records between checks; a squeeze (new parameters, or a mask) in between must
    show at the next check: the new rank and the spectrum of the factors as they are now."""
    from lora_monitor.in_squeeze.resize import squeeze_model

    model = peft_llama(r=8)
    monitor = Monitor()
    first = {m.name: m for m in monitor.check(model, 1).metrics}
    assert {m.nominal_rank for m in first.values()} == {8}
    squeeze_model(model, 3, mode=mode)
    with torch.no_grad():  # and training goes on: the values read must be today's
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.mul_(2.0)
    second = {m.name: m for m in monitor.check(model, 2).metrics}
    for name, layer in lora_layers(model).items():
        B = layer.lora_B["default"].weight.detach().double()[:, :3]
        A = layer.lora_A["default"].weight.detach().double()[:3]
        S = torch.linalg.svdvals(layer.scaling["default"] * B @ A)[:3]
        assert second[name].nominal_rank == 3
        assert second[name].sigma_max == pytest.approx(float(S[0]), rel=1e-9)
        assert second[name].effective_rank == pytest.approx(dense_effective_rank(S), rel=1e-9)
