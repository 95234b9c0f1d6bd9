"""``lora-monitor demo`` as a user runs it: quiet output, each alert once, and every adapter it writes reloads
as written (its base saved next to it and named in ``base_model_name_or_path``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.cli import main

STEPS = 6  # enough for the monitor to raise alerts on the demo's random base


@pytest.mark.parametrize(("steps", "message"), [("0", "got 0"), ("-3", "got -3")])
def test_demo_refuses_a_step_count_below_one_before_writing_anything(tmp_path, capsys, steps, message):
    # --steps 0 wrote the base and a run folder, then stopped on In-Squeeze's schedule; -3 trained by epochs.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", steps]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"lora-monitor demo: error: demo: steps must be at least 1, {message}"
    )
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lora-monitor demo: error: {tmp_path / 'taken'}: is a file; the demo writes its run into a folder (--out)"
    )
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo run once, in a child process with a user's environment: no WANDB_MODE set, wide lines (so
    that each alert is one line of the output)."""
    folder = tmp_path_factory.mktemp("demo")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("WANDB")}
    environment.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="2000")
    result = subprocess.run(
        [sys.executable, "-m", "lora_monitor.cli", "demo", "--out", "demo", "--steps", str(STEPS)],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "demo", result


@pytest.mark.slow  # the demo trains twice
def test_demo_prints_each_alert_once_and_no_third_party_noise(demo_run):
    output, result = demo_run
    records = [json.loads(line) for line in (output / "run1" / "lora_monitor.jsonl").read_text().splitlines()]
    alerts = [alert for record in records for alert in record["alerts"]]
    assert alerts, "the demo's run should raise alerts (its base is random and small)"
    lines = result.stdout.splitlines()
    for alert in alerts:
        shown = [line for line in lines if alert["message"] in line]
        assert len(shown) == 1, (alert["message"], shown)
        assert f"[{alert['severity']}] {alert['code']}" in shown[0]  # the severity is text, not rich markup
    # Nothing else on stderr: no alert logged a second time, no warning, no progress bar, no kernel message.
    assert result.stderr == ""
    assert "WANDB" not in result.stdout


@pytest.mark.slow  # the demo trains twice
def test_demo_adapters_reload_as_written(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output, _ = demo_run
    adapters = [output / "run1" / "adapter", output / "run1" / "squeezed", output / "run2" / "adapter"]
    for adapter in adapters:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base) == (output / "base").resolve()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        live = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
        saved = load_file(adapter / "adapter_model.safetensors")
        assert len(saved) == len(live)
        for key, tensor in saved.items():
            live_key = key.replace(".weight", ".default.weight")
            assert torch.equal(live[live_key], tensor), key


@pytest.mark.slow  # the demo trains twice
def test_command_runs_on_the_demo_output_as_written(demo_run, capsys):
    output, _ = demo_run
    adapter, base = output / "run1" / "adapter", output / "base"
    assert main(["analyze", str(adapter), "--base", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"] == str(base)
    status = main(
        ["squeeze", str(adapter), "--base", str(base), "--data", str(output / "heldout.txt"), "--json"]
    )
    assert status == 0
    function = json.loads(capsys.readouterr().out)["function"]
    assert function["recommended_rank"] is not None
