"""The rank an adapter is compressed at: one rule for the API, the command and the end of training, and each
route analyses the adapter once."""

from __future__ import annotations

import pytest
import torch
from dense_reference import decay_spectrum, dense_deltas, lora_layers
from peft import PeftModel
from tiny_models import peft_llama, tiny_llama

import lora_monitor.post_squeeze.analysis as analysis_module
from lora_monitor.cli import main
from lora_monitor.post_squeeze import SqueezeOptions, compress_adapter, squeeze_trained_adapter

THRESHOLD = 0.9


@pytest.fixture()
def model():
    """A rank-16 adapter whose modules decay at different rates, so that each needs its own rank."""
    model = peft_llama(0, r=16, lora_alpha=32)
    with torch.no_grad():
        for index, layer in enumerate(lora_layers(model).values()):
            ratio = 0.4 + 0.035 * index
            layer.lora_A["default"].weight.mul_((ratio ** torch.arange(16.0)).unsqueeze(1))
    return model


@pytest.fixture()
def folder(tmp_path, model):
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def count_analyses(monkeypatch) -> list[int]:
    """A counter of the analyses run from now on: each computes the spectra of its table once."""
    calls = [0]
    original = analysis_module._module_spectra

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "_module_spectra", counted)
    return calls


def reference_ranks(model) -> tuple[int, dict[str, int]]:
    """By a dense float64 SVD of each PEFT ``ΔW``: the smallest default candidate rank (powers of two and 16)
    whose mean retained energy over the modules reaches the threshold, and each module's smallest rank."""
    spectra = {name: torch.linalg.svdvals(delta) for name, delta in dense_deltas(model).items()}
    retained = {name: torch.cumsum(S**2, 0) / (S**2).sum() for name, S in spectra.items()}
    candidates = [1, 2, 4, 8, 16]
    means = {k: sum(float(curve[k - 1]) for curve in retained.values()) / len(retained) for k in candidates}
    assert all(abs(mean - THRESHOLD) > 1e-6 for mean in means.values())  # no tie at the threshold
    uniform = next(k for k in candidates if means[k] >= THRESHOLD)
    assert uniform not in (1, 16)  # the adapter makes the choice a real one
    per_module = {name: int((curve < THRESHOLD - 1e-12).sum()) + 1 for name, curve in retained.items()}
    assert len(set(per_module.values())) > 1
    return uniform, per_module


def reloaded_ranks(folder) -> dict[str, int]:
    return {
        name: layer.r["default"]
        for name, layer in lora_layers(PeftModel.from_pretrained(tiny_llama(0), folder)).items()
    }


def eval_batches() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


@pytest.mark.parametrize("per_module", [False, True])
def test_the_three_routes_compress_at_the_rank_a_dense_svd_gives(tmp_path, capsys, model, folder, per_module):
    uniform, by_module = reference_ranks(model)
    expected = by_module if per_module else {name: uniform for name in by_module}
    flag = ["--per-module"] if per_module else []

    api = compress_adapter(folder, tmp_path / "api", min_variance_retention=THRESHOLD, per_module=per_module)
    assert (
        main(["squeeze", str(folder), "--threshold", str(THRESHOLD), *flag, "--out", str(tmp_path / "cli")])
        == 0
    )
    capsys.readouterr()
    options = SqueezeOptions(min_variance_retention=THRESHOLD, per_module=per_module)
    trained = squeeze_trained_adapter(
        model, tmp_path / "run", options, compress_to="squeezed", intruders=False
    )

    assert not trained.warnings
    assert set(api.ranks.values()) == set(trained.compression.ranks.values())
    assert reloaded_ranks(tmp_path / "api") == expected
    assert reloaded_ranks(tmp_path / "cli") == expected
    assert reloaded_ranks(tmp_path / "run" / "squeezed") == expected


@pytest.mark.parametrize(
    "route", [["--per-module"], ["--allocate", "energy"]], ids=["per-module", "allocate"]
)
def test_the_command_analyses_once(tmp_path, capsys, monkeypatch, folder, route):
    calls = count_analyses(monkeypatch)
    assert main(["squeeze", str(folder), *route, "--out", str(tmp_path / "out")]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert calls[0] == 1


@pytest.mark.parametrize(
    ("per_module", "held_out"),
    [(False, False), (True, False), (False, True)],
    ids=["energy", "per-module", "function"],
)
def test_the_end_of_training_analyses_once(tmp_path, monkeypatch, model, per_module, held_out):
    calls = count_analyses(monkeypatch)
    result = squeeze_trained_adapter(
        model,
        tmp_path / "run",
        SqueezeOptions(per_module=per_module),
        compress_to="squeezed",
        eval_batches=eval_batches if held_out else None,
        intruders=False,
    )
    assert result.compression is not None and not result.warnings
    assert (result.function is not None) == held_out
    assert result.compression.analysis is result.analysis
    assert calls[0] == 1


def test_compress_adapter_takes_an_analysis_and_refuses_one_of_other_options(tmp_path, monkeypatch, folder):
    from lora_monitor.errors import LoraMonitorError
    from lora_monitor.post_squeeze import analyze_adapter

    analysis = analyze_adapter(folder, min_variance_retention=THRESHOLD)
    calls = count_analyses(monkeypatch)
    result = compress_adapter(folder, tmp_path / "out", analysis=analysis)
    assert calls[0] == 0 and result.analysis is analysis
    assert set(result.ranks.values()) == {analysis.recommended_rank}
    with pytest.raises(
        LoraMonitorError, match=r"the analysis given was made at min_variance_retention 0\.9 "
    ):
        compress_adapter(folder, tmp_path / "other", analysis=analysis, min_variance_retention=0.99)
    other = tmp_path / "r4"
    decay_spectrum(peft_llama(0, r=4)).save_pretrained(other)
    with pytest.raises(LoraMonitorError, match="the analysis given is of another adapter"):
        compress_adapter(other, tmp_path / "other", analysis=analysis)
    assert not (tmp_path / "other").exists()
