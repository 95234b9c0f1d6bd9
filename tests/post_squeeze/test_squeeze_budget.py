"""Per-module ranks under a parameter budget, against dense SVDs and an exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import PeftModel
from tiny_models import SENTENCES, peft_llama, tiny_llama

from lora_monitor import LoraMonitorError
from lora_monitor.adapters import factor_parameters, find_lora_modules
from lora_monitor.edit.edit import calibration_batches
from lora_monitor.post_squeeze import (
    budget_ranks_by_energy,
    budget_ranks_by_sensitivity,
    compress_adapter,
    parameters_per_rank,
    recommend_rank_by_function,
    uniform_budget,
)


def uneven_model():
    """A float64 adapter whose modules differ in size and strength, so a budget is worth spending unevenly."""
    model = peft_llama(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for index, record in enumerate(find_lora_modules(model)):
            B_param, _ = factor_parameters(record.module, record.adapter_name)
            decay = torch.logspace(0, -float(index % 3 + 1), B_param.shape[1], dtype=torch.float64)
            B_param.mul_(decay * (1.0 + index % 4) * (0.5 + torch.rand(1, generator=generator).double()))
    return model


def dense_spectra(model):
    return {
        record.name: torch.linalg.svdvals(record.scale * record.B.double() @ record.A.double())[: record.rank]
        for record in find_lora_modules(model)
    }


def test_energy_allocation_fits_the_budget_and_keeps_the_most_energy():
    model = uneven_model()
    records = find_lora_modules(model)
    budget = uniform_budget(model, 2)
    assert budget == sum(2 * (r.A.numel() + r.B.numel()) // r.rank for r in records)
    allocation = budget_ranks_by_energy(model, budget)
    cost = {r.name: (r.A.numel() + r.B.numel()) // r.rank for r in records}
    assert allocation.parameters == sum(allocation.module_ranks[n] * cost[n] for n in cost) <= budget
    spectra = dense_spectra(model)
    total = sum(float((S**2).sum()) for S in spectra.values())

    def kept(ranks):
        return sum(float((spectra[name][:k] ** 2).sum()) for name, k in ranks.items()) / total

    # The allocation reads the spectra the engine computes from float32 Gram products (analyze_adapter).
    assert allocation.retained == pytest.approx(kept(allocation.module_ranks), rel=1e-5)
    assert allocation.retained > kept(dict.fromkeys(spectra, 2))  # the uneven spend beats the uniform one
    # Greedy by gain per parameter: no module's next direction would fit in what is left...
    left = budget - allocation.parameters
    for name, rank in allocation.module_ranks.items():
        assert rank == 8 or cost[name] > left
    # ...and no single move of one direction from one module to another (within the budget) keeps more.
    for giver, taker in itertools.permutations(allocation.module_ranks, 2):
        moved = dict(allocation.module_ranks)
        if moved[giver] == 1 or moved[taker] == 8:
            continue
        moved[giver] -= 1
        moved[taker] += 1
        if sum(moved[n] * cost[n] for n in cost) <= budget:
            assert kept(moved) <= kept(allocation.module_ranks) + 1e-6


def test_module_ranks_write_each_modules_best_truncation(tmp_path):
    model = uneven_model().float()
    model.save_pretrained(tmp_path / "adapter")
    allocation = budget_ranks_by_energy(tmp_path / "adapter", uniform_budget(tmp_path / "adapter", 3))
    result = compress_adapter(tmp_path / "adapter", tmp_path / "out", module_ranks=allocation.module_ranks)
    assert result.ranks == allocation.module_ranks
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    originals = {r.name: r for r in find_lora_modules(model)}
    for record in find_lora_modules(loaded):
        source = originals[record.name]
        assert record.rank == allocation.module_ranks[record.name]
        U, S, Vh = torch.linalg.svd(source.scale * source.B.double() @ source.A.double())
        k = record.rank
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = record.scale * record.B.double() @ record.A.double()
        assert torch.allclose(got, best, atol=1e-5 * float(S[0]))
    with pytest.raises(LoraMonitorError, match="names no LoRA module"):
        compress_adapter(tmp_path / "adapter", tmp_path / "bad", module_ranks={"no.such.module": 2})
    with pytest.raises(LoraMonitorError, match="not more than one"):
        compress_adapter(tmp_path / "adapter", tmp_path / "bad", module_ranks={}, target_rank=2)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(LoraMonitorError, match="below"):
        budget_ranks_by_energy(tmp_path / "adapter", 10)


@pytest.mark.slow
def test_sensitivity_allocation_is_the_best_combination_of_type_ranks(tokenizer):
    model = uneven_model()
    data = calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)
    function = recommend_rank_by_function(
        model, data, ranks=[1, 2, 4, 8], by_module_type=True, progress=False
    )
    records = find_lora_modules(model)
    budget = uniform_budget(model, 2)
    allocation = budget_ranks_by_sensitivity(model, function, budget)
    types = sorted(function.type_evaluations)
    assert sorted(allocation.type_ranks) == types

    def price(kind, rank):
        return sum(min(rank, r.rank) * parameters_per_rank(r) for r in records if r.module_type == kind)

    # Exhaustive search over every combination of the candidate ranks (4 ranks, 3 types).
    best = min(
        (sum(function.type_evaluations[t][k].loss_increase for t, k in zip(types, ks, strict=True)), ks)
        for ks in itertools.product([1, 2, 4, 8], repeat=len(types))
        if sum(price(t, k) for t, k in zip(types, ks, strict=True)) <= budget
    )
    assert allocation.predicted_loss_increase == pytest.approx(best[0], abs=1e-12)
    assert allocation.parameters <= budget
    assert allocation.module_ranks == {r.name: allocation.type_ranks[r.module_type] for r in records}
    no_types = recommend_rank_by_function(model, data, ranks=[1, 2], progress=False)
    with pytest.raises(LoraMonitorError, match="by_module_type=True"):
        budget_ranks_by_sensitivity(model, no_types, budget)


# ---- issue 29: the budget is checked as every number is; no ranks from a NaN loss --------------------------


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (float("nan"), "budget must be a whole number, got nan"),
        ("4096", "budget must be a whole number, got '4096'"),
        (4096.5, "budget must be a whole number, got 4096.5"),
        (0, "budget must be at least 1, got 0"),
        (True, "budget must be a whole number, got True"),
    ],
)
def test_a_budget_that_is_not_a_whole_number_is_one_clear_error(budget, message):
    # A NaN budget was spent as "every module at full rank"; "4096" raised a TypeError.
    model = uneven_model()
    for allocate in (budget_ranks_by_energy, lambda m, b: budget_ranks_by_sensitivity(m, None, b)):
        with pytest.raises(LoraMonitorError) as refused:
            allocate(model, budget)
        assert str(refused.value).startswith(message)
    with pytest.raises(LoraMonitorError, match="rank must be a whole number, got '4'"):
        uniform_budget(model, "4")


@pytest.mark.slow
def test_no_ranks_are_chosen_from_evaluations_of_a_nan_loss(tokenizer):
    import dataclasses
    import math

    model = uneven_model()
    data = calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)
    function = recommend_rank_by_function(model, data, ranks=[1, 2, 8], by_module_type=True, progress=False)
    budget = uniform_budget(model, 2)
    broken = dataclasses.replace(function, full_loss=math.nan)
    with pytest.raises(LoraMonitorError, match="measured from a nan loss"):
        budget_ranks_by_sensitivity(model, broken, budget)
    # a rank whose truncated loss is NaN broke the model: it is never chosen while another rank fits
    kind = sorted(function.type_evaluations)[0]
    evaluations = {
        t: {r: dataclasses.replace(e) for r, e in by_rank.items()}
        for t, by_rank in function.type_evaluations.items()
    }
    for rank in (1, 2):
        evaluations[kind][rank].loss_increase = math.nan
    allocation = budget_ranks_by_sensitivity(
        model, dataclasses.replace(function, type_evaluations=evaluations), budget * 4
    )
    assert allocation.type_ranks[kind] == 8 and math.isfinite(allocation.predicted_loss_increase)
