"""torch FSDP2 (``fully_shard``), 2 gloo processes on the CPU, a plain training loop: the monitor's metrics, the
Post-Squeeze adapter and In-Squeeze mask mode, checked against a single process and a dense reference.

The worker is tests/distributed_workers/fsdp.py (one run for all three tests; processes meet through a file).
Accelerate 1.15 enables FSDP only on accelerators, so the Trainer + Accelerate + FSDP path is not run here
(examples/accelerate_fsdp.sh is that path, for GPU users).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from distributed_workers.launch import run_workers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tiny_models import peft_llama, tiny_llama

from lora_monitor import load_adapter
from lora_monitor.monitor import Monitor

SQUEEZED_RANK = 4
PROBE_IDS = [[1, 5, 9, 12, 7, 30, 4, 2]]
LORA_SCALE = 16 / 8  # peft_llama: lora_alpha 16, r 8
pytestmark = pytest.mark.slow  # two processes that train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_workers("fsdp", out, str(out))
    return out


def _trained_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module path -> s·B@A`` in float64, straight from a gathered state dict."""
    deltas = {}
    for key, A in state.items():
        if key.endswith(".lora_A.default.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            B = state[key.replace("lora_A", "lora_B")]
            deltas[name] = LORA_SCALE * B.double() @ A.double()
    return deltas


def _model_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module path -> s·B@A`` in float64, read from a reloaded PEFT model's own layers."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            B, A = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            deltas[name.removeprefix("base_model.model.")] = module.scaling["default"] * B @ A
    return deltas


def test_fsdp_metrics_equal_a_single_process_and_a_dense_reference(run):
    records = [json.loads((run / f"monitor{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]
    saved = torch.load(run / "trained.pt")
    trained = saved["trained"]
    # One process, unsharded, the same weights and the same (averaged) gradients of the last step.
    single, monitor = peft_llama(0), Monitor()
    single.load_state_dict(saved["before_step"]["state"], strict=True)
    for name, param in single.named_parameters():
        param.grad = saved["before_step"]["grads"].get(name)
    monitor.record_gradients(single, 3)
    single.load_state_dict(trained, strict=True)
    reference = monitor.check(single, 3).to_dict()
    assert [m["name"] for m in records[0]["modules"]] == [m["name"] for m in reference["modules"]]
    assert len(reference["modules"]) == 14
    assert all(1 < m["gradient_effective_rank"] <= 2 * 8 for m in reference["modules"])
    assert records[0]["modules"] == reference["modules"]
    assert records[0]["summary"] == reference["summary"]

    deltas = _trained_deltas(trained)
    for module in records[0]["modules"]:
        delta = deltas[module["name"]]
        S = torch.linalg.svdvals(delta)[:8]
        p = S / S.sum()
        assert module["sigma_max"] == pytest.approx(float(S[0]), rel=1e-9)
        assert module["frobenius"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-9)
        assert module["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
        base = trained[f"base_model.model.{module['name']}.base_layer.weight"].double()
        assert module["base_frobenius"] == pytest.approx(float(torch.linalg.norm(base)), rel=1e-6)
        # σmax(W) comes from a few power iterations (the design's choice), not from a full SVD.
        assert module["dominance"] == pytest.approx(float(S[0] / torch.linalg.svdvals(base)[0]), rel=2e-2)


def test_post_squeeze_compresses_the_gathered_adapter_on_the_main_process(run):
    manifest = json.loads((run / "squeeze_manifest.json").read_text())
    rank = manifest["recommended_rank"]
    assert rank is not None and rank < 8  # a real compression, not a copy
    assert {m.rank for m in load_adapter(run / "squeezed")} == {rank}

    deltas = _trained_deltas(torch.load(run / "trained.pt")["trained"])
    reloaded = _model_deltas(PeftModel.from_pretrained(tiny_llama(0), run / "squeezed"))
    assert reloaded.keys() == deltas.keys()
    for name, delta in deltas.items():
        U, S, Vh = torch.linalg.svd(delta)
        best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]  # Eckart–Young: the best rank-k delta
        assert torch.allclose(reloaded[name], best, atol=1e-5 * float(S[0])), name


def test_in_squeeze_mask_mode_ends_identical_on_both_processes_and_reloads_equal(run):
    first, second = (torch.load(run / f"masked{rank}.pt") for rank in (0, 1))
    assert first["factors"].keys() == second["factors"].keys() and len(first["factors"]) == 28
    for key, tensor in first["factors"].items():
        assert torch.equal(tensor, second["factors"][key]), key
        dropped = tensor[SQUEEZED_RANK:] if ".lora_A." in key else tensor[:, SQUEEZED_RANK:]
        assert dropped.abs().max() == 0, key
        for moment, value in first["moments"][key].items():
            assert torch.equal(value, second["moments"][key][moment])
            held = value[SQUEEZED_RANK:] if ".lora_A." in key else value[:, SQUEEZED_RANK:]
            assert held.abs().max() == 0, (key, moment)
    assert torch.equal(first["logits"], second["logits"])
    for refusal in (first["resize_refusal"], second["resize_refusal"]):
        assert "mode='resize' cannot run under FSDP" in refusal and "use mode='mask'" in refusal
    for found in (first["gradient_mask"], second["gradient_mask"]):
        assert found["kept"] > 0 and found["dropped"] == 0  # the mask zeroed a gradient that was there

    assert {m.rank for m in load_adapter(run / "final")} == {SQUEEZED_RANK}
    reloaded = PeftModel.from_pretrained(tiny_llama(0), run / "final").eval()
    deltas = _trained_deltas(first["factors"])
    for name, delta in _model_deltas(reloaded).items():
        assert torch.allclose(delta, deltas[name], atol=1e-6), name
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor(PROBE_IDS)).logits
    assert torch.allclose(logits, first["logits"], atol=1e-5)
