"""Intruder dimensions checked against a dense computation on a real PEFT model's weights."""

from __future__ import annotations

import pytest
import torch
from tiny_models import peft_llama, tiny_llama

from lora_monitor.adapters import find_lora_modules
from lora_monitor.monitor.intruders import BaseSubspaceCache, intruder_dimensions


def _dense_similarities(base: torch.Tensor, fine_tuned: torch.Tensor, top_k: int) -> torch.Tensor:
    base_vectors = torch.linalg.svd(base.double(), full_matrices=False).U
    tuned_vectors = torch.linalg.svd(fine_tuned.double(), full_matrices=False).U[:, :top_k]
    return (base_vectors.mT @ tuned_vectors).abs().amax(dim=0)


def _plant_direction(layer, adapter: str, strength: float, seed: int) -> None:
    """Make ΔW one strong direction (a fine-tuned weight with a clear top singular vector)."""
    generator = torch.Generator().manual_seed(seed)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        A.zero_()
        B.zero_()
        A[0] = torch.randn(A.shape[1], generator=generator)
        B[:, 0] = torch.randn(B.shape[0], generator=generator)
        B[:, 0] *= strength / (B[:, 0].norm() * A[0].norm() * layer.scaling[adapter])


def test_similarities_and_counts_match_a_dense_svd_of_w_plus_delta():
    model = peft_llama(0, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    modules = find_lora_modules(model)
    # One module gets a dominant new direction, so that intruders exist; the others are small random updates.
    _plant_direction(modules[0].module, "default", strength=20.0, seed=3)
    top_k, epsilon = 10, 0.5
    # Oversampling past the matrix size makes the randomized SVD exact: the comparison is then to 1e-5.
    results = intruder_dimensions(
        modules, lambda m: m.base_weight(), top_k=top_k, epsilon=epsilon, oversample=256, power_iters=2
    )
    assert [r.name for r in results] == [m.name for m in modules]
    for module, result in zip(modules, results, strict=True):
        base = module.base_weight()
        delta = module.module.get_delta_weight("default")
        expected = _dense_similarities(base, base + delta, top_k)
        assert result.similarities == pytest.approx(expected.tolist(), abs=1e-4)
        assert result.count == int((expected < epsilon).sum())
    assert results[0].count >= 1, "a planted direction unrelated to the base must show as an intruder"
    assert results[0].similarities[0] < epsilon


def test_zero_adapter_has_no_intruders_and_base_vectors_are_cached():
    model = peft_llama(1, init_lora_weights=True)  # B = 0: the fine-tuned weight is the base
    modules = find_lora_modules(model)
    cache = BaseSubspaceCache(reference_rank=None)
    results = intruder_dimensions(modules, lambda m: m.base_weight(), cache=cache, oversample=256)
    assert all(r.count == 0 for r in results)
    assert all(min(r.similarities) > 0.999 for r in results)
    assert len(cache) == len(modules)
    first = cache.vectors(modules[0].name, modules[0].base_weight())
    again = intruder_dimensions(modules[:1], lambda m: m.base_weight(), cache=cache)
    assert cache.vectors(modules[0].name, modules[0].base_weight()) is first and again[0].count == 0


def test_top_reference_subspace_by_randomized_svd_matches_the_dense_top_vectors():
    model = peft_llama(2, r=4, target_modules=["q_proj"])
    modules = find_lora_modules(model)
    generator = torch.Generator().manual_seed(5)
    for module in modules:  # base weights with a decaying spectrum: well-separated top directions
        layer = module.base_layer
        m, n = layer.weight.shape
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
        with torch.no_grad():
            layer.weight.copy_((U[:, :n] * (0.7 ** torch.arange(n))) @ V.mT)
    reference_rank, top_k = 8, 5
    results = intruder_dimensions(
        modules,
        lambda m: m.base_weight(),
        top_k=top_k,
        cache=BaseSubspaceCache(reference_rank=reference_rank),
        oversample=256,
    )
    for module, result in zip(modules, results, strict=True):
        base = module.base_weight().double()
        tuned = base + module.module.get_delta_weight("default").double()
        base_top = torch.linalg.svd(base, full_matrices=False).U[:, :reference_rank]
        tuned_top = torch.linalg.svd(tuned, full_matrices=False).U[:, :top_k]
        expected = (base_top.mT @ tuned_top).abs().amax(dim=0)
        assert result.similarities == pytest.approx(expected.tolist(), abs=1e-4)


def test_analyze_with_base_reports_intruders_matching_a_dense_svd(tmp_path, capsys):
    import json

    from lora_monitor.cli import main

    model = peft_llama(3, r=4, target_modules=["q_proj", "v_proj"])
    modules = find_lora_modules(model)
    _plant_direction(modules[0].module, "default", strength=20.0, seed=4)
    model.save_pretrained(tmp_path / "adapter")
    tiny_llama(3).save_pretrained(tmp_path / "base")  # the very base peft_llama(3) was built on
    expected = {}
    for module in modules:
        base = module.base_weight()
        tuned = base + module.module.get_delta_weight("default")
        expected[module.name] = _dense_similarities(base, tuned, 10)

    assert main(["analyze", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {item["name"]: item for item in report["intruders"]}
    assert found.keys() == expected.keys()
    planted = found[modules[0].name]
    # The planted direction is the top one by far: the randomized SVD finds it to high accuracy.
    assert planted["similarities"][0] == pytest.approx(float(expected[modules[0].name][0]), abs=1e-3)
    assert planted["count"] >= 1 and planted["similarities"][0] < planted["epsilon"]
    assert main(["analyze", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 0
    assert "Intruder dimensions" in capsys.readouterr().out


def test_monitor_counts_intruders_at_its_own_low_frequency():
    from lora_monitor.monitor import Monitor

    model = peft_llama(4, r=4, target_modules=["q_proj", "v_proj"])
    modules = find_lora_modules(model)
    _plant_direction(modules[0].module, "default", strength=20.0, seed=5)
    monitor = Monitor(intruders_every=2)
    first = monitor.check(model, step=1)
    assert "lora/intruder_dimensions" not in first.scalars
    assert all(m.intruder_dimensions is None for m in first.metrics)
    second = monitor.check(model, step=2)
    expected = {r.name: r.count for r in intruder_dimensions(modules, lambda m: m.base_weight())}
    assert {m.name: m.intruder_dimensions for m in second.metrics} == expected
    assert second.scalars["lora/intruder_dimensions"] == sum(expected.values()) >= 1
    assert second.scalars["lora/modules_with_intruders"] == sum(count > 0 for count in expected.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 2.5}, "top_k must be a whole number, got 2.5"),
        ({"top_k": 0}, "top_k must be at least 1, got 0"),
        ({"top_k": "10"}, "top_k must be a whole number, got '10'"),
        ({"epsilon": 1.5}, "epsilon must be above 0 and at most 1, got 1.5"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number, got nan"),
        ({"oversample": -1}, "oversample must be at least 0, got -1"),
        ({"power_iters": 1.5}, "power_iters must be a whole number, got 1.5"),
    ],
)
def test_bad_options_are_one_clear_error_naming_the_option(options, message):
    # Issue 29: top_k=2.5 raised torch's TypeError, top_k=0 and epsilon=1.5 a plain ValueError.
    from lora_monitor.errors import LoraMonitorError

    modules = find_lora_modules(peft_llama(0, r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(LoraMonitorError) as refused:
        intruder_dimensions(modules, lambda m: m.base_weight(), **options)
    assert str(refused.value).startswith(message)


def test_a_bad_reference_rank_is_one_clear_error():
    from lora_monitor.errors import LoraMonitorError

    for reference_rank, message in ((0, "at least 1, got 0"), (2.5, "a whole number, got 2.5")):
        with pytest.raises(LoraMonitorError, match=f"reference_rank must be {message}"):
            BaseSubspaceCache(reference_rank)
    assert BaseSubspaceCache(None).reference_rank is None


def test_factors_whose_product_overflows_float32_are_one_error_naming_the_module():
    # Finite factors of 1e19 make a ΔW of about 1e38 per entry: its operator overflows float32, where the
    # randomized SVD raised torch's LinAlgError through the command.
    from lora_monitor import LoraMonitorError, analyze_adapter

    model = peft_llama(0, r=4, target_modules=["q_proj"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(1e19)
    modules = find_lora_modules(model)
    with pytest.raises(LoraMonitorError) as refused:
        intruder_dimensions(modules, lambda m: m.base_weight())
    assert str(refused.value) == (
        f"module {modules[0].name}: W + ΔW has no finite spectrum in float32 (factors too large?); no intruder "
        "dimensions were counted"
    )
    with torch.no_grad():  # 1e21: the Gram matrices of the energy table overflow too
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(100)
    with pytest.raises(
        LoraMonitorError, match=r"the spectrum of .* (could not be computed|is not finite) \(factors"
    ):
        analyze_adapter(model, progress=False)
