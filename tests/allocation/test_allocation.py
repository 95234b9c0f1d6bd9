"""Rank before training: heavy-tail metrics checked against WeightWatcher, ranks checked through real PEFT."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_models import SENTENCES, tiny_llama
from torch import nn

from lora_monitor.adapters import pattern_key
from lora_monitor.allocation import (
    allocate_ranks,
    fit_marchenko_pastur,
    fit_power_law,
    probe_rank,
    spectral_analysis,
)
from lora_monitor.allocation.probe import PROBE_CAVEAT
from lora_monitor.cli import main
from lora_monitor.errors import LoraMonitorError
from lora_monitor.spectrum import rank_for_energy, weight_singular_values

LLAMA_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------------
# Planted spectra
# --------------------------------------------------------------------------------------------------------


def planted_power_law(m: int, n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """A weight whose ESD is a Pareto sample with density ∝ λ^-alpha (λ ≥ 1), scaled down."""
    k = min(m, n)
    uniform = torch.rand(k, generator=generator, dtype=torch.float64)
    eigenvalues = (1 - uniform) ** (-1 / (alpha - 1))
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return (U * eigenvalues.sqrt()) @ V.T * 0.05


def planted_spikes(m: int, n: int, spikes: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian MP bulk plus ``spikes`` rank-one directions far above its edge."""
    W = torch.randn(m, n, generator=generator, dtype=torch.float64) / math.sqrt(max(m, n))
    for s in range(spikes):
        u = torch.randn(m, generator=generator, dtype=torch.float64)
        v = torch.randn(n, generator=generator, dtype=torch.float64)
        W += (3 + s) * torch.outer(u / u.norm(), v / v.norm())
    return W


PLANTED = [  # (kind, m, n, planted alpha or spike count)
    ("power_law", 256, 128, 2.5),
    ("power_law", 200, 100, 3.5),
    ("power_law", 128, 128, 4.0),
    ("spikes", 256, 128, 3),
    ("spikes", 160, 160, 5),
    ("spikes", 300, 100, 2),
    ("power_law", 40, 16, 3.0),  # fewer than 20 eigenvalues: WeightWatcher's small-sample fit
]


@pytest.fixture(scope="module")
def planted_model() -> nn.Sequential:
    generator = torch.Generator().manual_seed(0)
    layers = []
    for kind, m, n, value in PLANTED:
        W = (planted_power_law if kind == "power_law" else planted_spikes)(m, n, value, generator)
        layer = nn.Linear(n, m, bias=False, dtype=torch.float64)
        layer.weight.data.copy_(W)
        layers.append(layer)
    return nn.Sequential(*layers)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = torch.tensor(values).argsort()
        out = torch.empty(len(values))
        out[order] = torch.arange(len(values), dtype=torch.float32)
        return out

    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def weightwatcher_details(model: nn.Module):
    weightwatcher = pytest.importorskip("weightwatcher")
    watcher = weightwatcher.WeightWatcher(model=model, log_level=logging.ERROR)
    return watcher.analyze(mp_fit=True)


def compare_with_weightwatcher(ours, details, label: str) -> None:
    """Our KS-rule α, D, xmin, σ_mp and spike counts against WeightWatcher's, printed and asserted."""
    by_name = {str(row.longname): row for _, row in details.iterrows()}
    pairs = [(layer, by_name[layer.name]) for layer in ours if layer.name in by_name]
    assert len(pairs) == len(ours), "every analysed layer must have a WeightWatcher row"
    alpha_gap = max(abs(layer.alpha - row.alpha) for layer, row in pairs)
    ks_gap = max(abs(layer.ks_distance - row.D) for layer, row in pairs)
    sigma_gap = max(abs(layer.sigma_mp - row.sigma_mp) for layer, row in pairs)
    spike_gap = max(abs(layer.num_spikes - int(row.num_spikes)) for layer, row in pairs)
    correlation = spearman([layer.alpha for layer, _ in pairs], [float(row.alpha) for _, row in pairs])
    print(
        f"\n[{label}] {len(pairs)} layers vs WeightWatcher: max |Δα| = {alpha_gap:.2e}, max |ΔD| = {ks_gap:.2e}, "
        f"max |Δσ_mp| = {sigma_gap:.2e}, max |Δspikes| = {spike_gap}, rank correlation of α = {correlation:.4f}"
    )
    for layer, row in pairs:
        assert layer.alpha == pytest.approx(row.alpha, rel=1e-6), layer.name
        assert layer.xmin == pytest.approx(row.xmin, rel=1e-6), layer.name
        assert layer.ks_distance == pytest.approx(row.D, abs=1e-6), layer.name
        assert layer.tail_size == int(row.num_pl_spikes), layer.name
        assert layer.sigma_mp == pytest.approx(row.sigma_mp, rel=1e-4), layer.name
        assert layer.bulk_max == pytest.approx(row.bulk_max, rel=1e-4), layer.name
        assert layer.num_spikes == int(row.num_spikes), layer.name
        assert layer.stable_rank == pytest.approx(row.stable_rank, rel=1e-7), layer.name
        assert layer.spectral_norm**2 == pytest.approx(row.spectral_norm, rel=1e-7), layer.name
    assert correlation > 0.999


@pytest.mark.slow
def test_planted_spectra_match_weightwatcher_and_the_planted_truth(planted_model):
    ours = spectral_analysis(planted_model, fit="ks", progress=False)
    compare_with_weightwatcher(ours, weightwatcher_details(planted_model), "planted spectra")
    for (kind, _, _, value), layer in zip(PLANTED, ours, strict=True):
        if kind == "spikes":
            # Every planted direction stands above the bulk, and nothing else does.
            assert layer.num_spikes == value, layer.name
    # The Hill exponent recovers the planted tail on the larger matrices.
    assert ours[0].alpha == pytest.approx(2.5, abs=0.3)
    assert ours[1].alpha == pytest.approx(3.5, abs=0.3)


def test_median_rule_is_the_hill_estimate_weightwatcher_gives_at_the_median(planted_model):
    from weightwatcher.WW_powerlaw import WWFit

    for layer in spectral_analysis(planted_model, fit="median", progress=False):
        values = torch.sort(layer.eigenvalues).values
        values = values[values > 1e-5].numpy()
        if len(values) < 20:
            continue  # WeightWatcher's scan uses its bias-corrected estimator there
        reference = WWFit(values)
        middle = len(values) // 2
        assert layer.alpha == pytest.approx(reference.alphas[middle], rel=1e-10)
        assert layer.ks_distance == pytest.approx(reference.Ds[middle], abs=1e-10)
        assert layer.xmin == values[middle]
        # And the closed form, from the eigenvalues directly.
        tail = torch.from_numpy(values[middle:])
        assert layer.alpha == pytest.approx(1 + len(tail) / float(torch.log(tail / tail[0]).sum()), rel=1e-10)


@pytest.mark.slow
def test_tiny_llama_weights_match_weightwatcher():
    model = tiny_llama(seed=3)
    generator = torch.Generator().manual_seed(1)
    # Give some layers structure (spikes of different strengths) so the comparison is not all zeros.
    with torch.no_grad():
        for index, module in enumerate(model.modules()):
            if isinstance(module, nn.Linear) and index % 3 == 0:
                m, n = module.weight.shape
                for s in range(index % 5 + 1):
                    u, v = torch.randn(m, generator=generator), torch.randn(n, generator=generator)
                    module.weight += 0.05 * (1 + s) * torch.outer(u / u.norm(), v / v.norm())
    ours = spectral_analysis(model, fit="ks", include_embeddings=True, progress=False)
    assert {layer.name for layer in ours} >= {"lm_head", "model.embed_tokens", "model.layers.1.mlp.down_proj"}
    compare_with_weightwatcher(ours, weightwatcher_details(model), "tiny Llama")
    assert sum(layer.num_spikes for layer in ours) > 0


def test_analysis_defaults_leave_out_embeddings_and_follow_target_modules():
    model = tiny_llama()
    names = [layer.name for layer in spectral_analysis(model, progress=False)]
    assert len(names) == 14 and "lm_head" not in names and "model.embed_tokens" not in names
    picked = spectral_analysis(model, target_modules=["q_proj", "v_proj"], progress=False)
    assert [layer.name for layer in picked] == [
        f"model.layers.{i}.self_attn.{kind}" for i in range(2) for kind in ("q_proj", "v_proj")
    ]
    # The eigenvalues are the squared singular values of the weight, from an independent dense SVD.
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    torch.testing.assert_close(picked[0].eigenvalues, torch.linalg.svdvals(weight) ** 2)
    assert picked[0].shape == (64, 64)
    with pytest.raises(LoraMonitorError, match="target_modules"):
        spectral_analysis(model, target_modules=["no_such_module"], progress=False)


def test_conv_weights_are_flattened_to_out_by_rest():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Module()
    model.attn = Conv1D(48, 32)  # GPT-2 style: weight stored (in, out)
    model.conv = nn.Conv2d(3, 8, kernel_size=3)
    spectra = {layer.name: layer for layer in spectral_analysis(model, progress=False)}
    assert spectra["attn"].shape == (48, 32) and spectra["conv"].shape == (8, 27)
    torch.testing.assert_close(
        spectra["attn"].eigenvalues, torch.linalg.svdvals(model.attn.weight.double().T) ** 2
    )
    conv = model.conv.weight.double().reshape(8, 27)
    torch.testing.assert_close(spectra["conv"].eigenvalues, torch.linalg.svdvals(conv) ** 2)


def test_a_peft_model_is_analysed_through_its_base_weights():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    plain = spectral_analysis(model, target_modules=["q_proj"], progress=False)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    through_peft = spectral_analysis(wrapped, target_modules=["q_proj"], progress=False)
    assert [layer.name for layer in through_peft] == [layer.name for layer in plain]
    for a, b in zip(plain, through_peft, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues)


def test_weight_singular_values_batches_by_shape_and_keeps_the_order():
    generator = torch.Generator().manual_seed(2)
    shapes = [(20, 12), (12, 20), (20, 12), (7, 3, 2, 2), (20, 12), (12, 20)]
    weights = [torch.randn(*shape, generator=generator) for shape in shapes]
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        values = weight_singular_values(weights, dtype=dtype, batch_size=2)
        for weight, got in zip(weights, values, strict=True):
            expected = torch.linalg.svdvals(weight.double().reshape(weight.shape[0], -1))
            assert got.dtype == torch.float64 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="floating-point"):
        weight_singular_values([torch.ones(3, 3, dtype=torch.int8)])


def test_marchenko_pastur_edge_on_a_pure_random_matrix_has_no_spikes():
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(400, 200, generator=generator, dtype=torch.float64)
    bulk = fit_marchenko_pastur(torch.linalg.svdvals(W) ** 2, 400, 200)
    assert bulk.num_spikes == 0
    # λ+ of an N(0,1) 400×200 matrix is (√400 + √200)² in WᵀW units; the fit lands near it.
    assert bulk.bulk_max == pytest.approx((math.sqrt(400) + math.sqrt(200)) ** 2, rel=0.1)
    assert bulk.edge > bulk.bulk_max


def test_power_law_fit_rejects_unknown_rules_and_survives_tiny_spectra():
    with pytest.raises(LoraMonitorError, match="fit rule"):
        fit_power_law(torch.ones(10), "mean")
    assert math.isnan(fit_power_law(torch.tensor([1.0]), "ks").alpha)


# --------------------------------------------------------------------------------------------------------
# Rank allocation through PEFT
# --------------------------------------------------------------------------------------------------------


def lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name[len(prefix) :]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def test_get_peft_model_gives_each_module_the_rank_asked_for():
    from peft import LoraConfig, get_peft_model

    spectra = spectral_analysis(tiny_llama(), progress=False)
    allocation = allocate_ranks(spectra, min_rank=2, max_rank=16, layer_fraction=0.5, alpha_factor=1.5)
    assert len(allocation.target_modules) == 7
    ranks = list(allocation.rank_pattern.values())
    assert min(ranks) == 2 and max(ranks) == 16
    # The adapted layers are the half with the lowest scores; within them rank grows with the score.
    chosen = [layer for layer in allocation.layers if layer.selected]
    left_out = [layer for layer in allocation.layers if not layer.selected]
    assert max(layer.score for layer in chosen) <= min(layer.score for layer in left_out)
    by_score = sorted(chosen, key=lambda layer: layer.score)
    assert [layer.rank for layer in by_score] == sorted(layer.rank for layer in by_score)

    rank_pattern, _alpha_pattern, target_modules = allocation
    assert rank_pattern is allocation.rank_pattern and target_modules == allocation.target_modules

    peft_model = get_peft_model(tiny_llama(), LoraConfig(**allocation.lora_config_kwargs()))
    adapted = lora_layers(peft_model)
    assert set(adapted) == set(allocation.target_modules)
    for name, module in adapted.items():
        rank = allocation.rank_pattern[pattern_key(name)]  # keys match exactly one module path
        assert module.r["default"] == rank
        assert module.lora_A["default"].weight.shape[0] == rank
        assert module.scaling["default"] == pytest.approx(allocation.alpha_pattern[pattern_key(name)] / rank)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == allocation.trainable_parameters


@pytest.mark.parametrize("scaling", ["log", "sqrt"])
def test_other_scalings_keep_the_range_and_the_order(scaling):
    spectra = spectral_analysis(tiny_llama(), progress=False)
    allocation = allocate_ranks(spectra, min_rank=4, max_rank=32, layer_fraction=1.0, scaling=scaling)
    assert len(allocation.rank_pattern) == 14
    by_score = sorted(allocation.layers, key=lambda layer: layer.score)
    assert by_score[0].rank == 4 and by_score[-1].rank == 32
    assert [layer.rank for layer in by_score] == sorted(layer.rank for layer in by_score)


@pytest.mark.parametrize("budget", [3_000, 10_000, 25_000])
def test_parameter_budget_is_met_within_one_rank_step(budget):
    from peft import LoraConfig, get_peft_model

    spectra = spectral_analysis(tiny_llama(), progress=False)
    allocation = allocate_ranks(spectra, layer_fraction=0.5, parameter_budget=budget)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**allocation.lora_config_kwargs()))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    largest_step = max(sum(layer.spectrum.shape) for layer in allocation.layers if layer.selected)
    print(
        f"\nbudget {budget}: {trainable} trainable LoRA parameters (one rank step is at most {largest_step})"
    )
    assert budget - largest_step < trainable <= budget
    for name, module in lora_layers(peft_model).items():
        assert module.r["default"] == allocation.rank_pattern[pattern_key(name)]


def test_budget_out_of_reach_and_bad_options_are_clear_errors():
    spectra = spectral_analysis(tiny_llama(), progress=False)
    with pytest.raises(LoraMonitorError, match="below"):
        allocate_ranks(spectra, parameter_budget=10)
    with pytest.raises(LoraMonitorError, match="min_rank"):
        allocate_ranks(spectra, min_rank=8, max_rank=4)
    with pytest.raises(LoraMonitorError, match="layer_fraction"):
        allocate_ranks(spectra, layer_fraction=0)
    with pytest.raises(LoraMonitorError, match="scaling"):
        allocate_ranks(spectra, scaling="cubic")
    with pytest.raises(LoraMonitorError, match=r"parameter_budget must be a whole number, got 2000\.5"):
        allocate_ranks(spectra, parameter_budget=2000.5)
    with pytest.raises(LoraMonitorError, match="alpha_factor must be above 0"):
        allocate_ranks(spectra, alpha_factor=0)
    with pytest.raises(LoraMonitorError, match="min_rank must be a whole number"):
        allocate_ranks(spectra, min_rank=2.5)


def test_allocation_options_are_a_dataclass_checked_when_made():
    from lora_monitor.allocation import AllocationOptions

    with pytest.raises(LoraMonitorError, match=r"max_rank must be at least 8, got 4 \(min_rank=8\)"):
        AllocationOptions(min_rank=8, max_rank=4)
    with pytest.raises(LoraMonitorError, match=r"scaling must be one of \('linear', 'log', 'sqrt'\)"):
        AllocationOptions(scaling="cubic")
    assert AllocationOptions(min_rank=2).max_rank == 64


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scaling": "cubic"}, "scaling must be one of ('linear', 'log', 'sqrt'), got 'cubic'"),
        ({"fit": "mean"}, "fit must be one of ('median', 'ks'), got 'mean'"),
        ({"w_alpha": float("nan")}, "w_alpha must be a finite number, got nan"),
        ({"w_spikes": -0.5}, "w_spikes must be at least 0, got -0.5"),
        ({"w_alpha": "0.7"}, "w_alpha must be a number, got '0.7'"),
    ],
)
def test_every_option_of_allocate_ranks_is_checked_up_front(options, message):
    # Issue 29: the weights were not checked at all (a NaN weight made every score NaN) and the choices
    # had their own messages; the API and the command now share one check and one message.
    spectra = spectral_analysis(tiny_llama(), progress=False)
    with pytest.raises(LoraMonitorError) as refused:
        allocate_ranks(spectra, **options)
    assert str(refused.value).startswith(message)
    # from the model too: refused before its weight spectra are computed
    with pytest.raises(LoraMonitorError) as from_model:
        allocate_ranks(torch.nn.Linear(2, 2), **options)
    assert str(from_model.value) == str(refused.value)


def test_spectral_analysis_checks_its_options():
    with pytest.raises(LoraMonitorError, match=r"fit must be one of \('median', 'ks'\), got 'mean'"):
        spectral_analysis(tiny_llama(), fit="mean", progress=False)
    with pytest.raises(LoraMonitorError, match="batch_size must be at least 1, got 0"):
        spectral_analysis(tiny_llama(), batch_size=0, progress=False)


def test_pattern_keys_never_match_a_neighbour_module():
    """A ``.`` in a key is a regex wildcard for PEFT: ``block.proj`` would also match ``blockxproj``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Module()
    model.block = nn.Module()
    model.block.proj = nn.Linear(48, 48)
    model.blockxproj = nn.Linear(48, 48)
    model.other = nn.Linear(48, 48)
    with torch.no_grad():
        model.block.proj.weight.mul_(torch.linspace(0.1, 3, 48))  # different spectra, different ranks
    allocation = allocate_ranks(model, min_rank=2, max_rank=12, layer_fraction=1.0, progress=False)
    assert len(set(allocation.rank_pattern.values())) > 1
    peft_model = get_peft_model(model, LoraConfig(**allocation.lora_config_kwargs()))
    rank_of = {layer.name: layer.rank for layer in allocation.layers}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "r") and isinstance(module.r, dict):
            assert module.r["default"] == rank_of[name], name


# --------------------------------------------------------------------------------------------------------
# Gradient probe
# --------------------------------------------------------------------------------------------------------


def test_probe_rank_recommends_ranks_and_changes_nothing(lm_dataset):
    from torch.utils.data import DataLoader

    model = tiny_llama()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # a mix of flags, to see them restored exactly
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    loader = DataLoader(lm_dataset.with_format("torch"), batch_size=4)
    probe = probe_rank(model, loader, steps=2, threshold=0.9)

    assert set(probe.type_ranks) == set(LLAMA_TYPES)
    assert probe.steps == 2
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.requires_grad == flags[name], name
        assert param.grad is None, name
    for name, rank in probe.module_ranks.items():
        assert 1 <= rank <= 32, name  # at most the short side of the smallest weight (k/v: 32×64)
    for kind, rank in probe.type_ranks.items():
        assert rank & (rank - 1) == 0 and 1 <= rank <= 64, kind
    assert probe.summary().startswith(f"Based on your data, r={probe.rank} ")
    # the reading is never presented as the rank to train: it says what it measured against the knee
    assert (
        probe.summary().endswith(f"batches), {PROBE_CAVEAT}") and "an upper bound, not advice" in PROBE_CAVEAT
    )

    # Reference: the same gradients by a plain backward pass on a fresh copy, and a dense SVD.
    reference = tiny_llama()
    for step, batch in enumerate(loader):
        if step == 2:
            break
        reference(**batch).loss.backward()
    q_grad = reference.model.layers[1].self_attn.q_proj.weight.grad
    expected = rank_for_energy(torch.linalg.svdvals(q_grad.double()), 0.9)
    assert probe.module_ranks["model.layers.1.self_attn.q_proj"] == expected


def test_probe_rank_needs_a_loss(tokenizer):
    model = tiny_llama()
    batch = tokenizer(["the adapter learns"], return_tensors="pt")
    with pytest.raises(LoraMonitorError, match="no loss"):
        probe_rank(model, [dict(batch)], steps=1)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(LoraMonitorError, match="threshold must be above 0 and at most 1, got 0"):
        probe_rank(model, [dict(batch)], threshold=0)
    with pytest.raises(LoraMonitorError, match="steps must be at least 1, got 0"):
        probe_rank(model, [dict(batch)], steps=0)


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def test_cli_allocate_prints_the_table_and_json(tmp_path, capsys):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    assert main(["allocate", str(folder), "--min-rank", "2", "--max-rank", "8", "--fraction", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "LoraConfig" in table

    assert main(["allocate", str(folder), "--json", "--scaling", "sqrt", "--budget", "8000"]) == 0
    payload = json.loads(capsys.readouterr().out)
    config = payload["lora_config"]
    assert len(payload["layers"]) == 14 and len(config["target_modules"]) == 7
    assert set(config["rank_pattern"]) == {pattern_key(name) for name in config["target_modules"]}
    assert 8000 - 256 < payload["trainable_parameters"] <= 8000


def test_cli_allocate_bad_folder_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["allocate", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["allocate", str(empty)]) == 2
    error = capsys.readouterr().err
    assert "config.json" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-rank", "0"], "min_rank must be at least 1, got 0"),
        (["--min-rank", "8", "--max-rank", "4"], "max_rank must be at least 8, got 4 (min_rank=8)"),
        (["--fraction", "1.5"], "layer_fraction must be above 0 and at most 1, got 1.5"),
        (["--budget", "0"], "parameter_budget must be at least 1, got 0"),
    ],
)
def test_cli_allocate_checks_its_options_before_loading_the_model(tmp_path, capsys, options, message):
    # The folder holds a config.json but no model: the option is what is reported, so it was checked first
    # (before the model load and the weight spectra, minutes on a real model).
    (tmp_path / "config.json").write_text("{}")
    assert main(["allocate", str(tmp_path), *options]) == 2
    assert capsys.readouterr().err == f"lora-monitor allocate: error: {message}\n"


def test_probe_rank_gives_no_advice_from_a_loss_over_no_token(tokenizer):
    # Issue 29: a batch that scores no label (one-token texts: a causal LM has nothing to predict) has a NaN
    # loss; its NaN gradient, summed in, made every singular value and so every rank NaN-driven.
    from lora_monitor.edit import calibration_batches

    one_token = calibration_batches(["adapter", "rank"], tokenizer, batch_size=1)
    clean = calibration_batches(SENTENCES[:4], tokenizer, batch_size=2)
    mixed = probe_rank(tiny_llama(), [one_token[0], *clean], steps=2, threshold=0.9)
    alone = probe_rank(tiny_llama(), clean, steps=2, threshold=0.9)
    assert mixed.steps == 2 and mixed.module_ranks == alone.module_ranks
    assert all(torch.isfinite(curve).all() for curve in mixed.energy_curves.values())
    with pytest.raises(LoraMonitorError, match="none with a label to predict"):
        probe_rank(tiny_llama(), one_token, steps=2)
    broken = tiny_llama()
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(LoraMonitorError, match="dataloader: the loss of batch 0 is nan"):
        probe_rank(broken, clean, steps=2)


def test_probe_rank_warns_where_it_does_not_apply_a_classifier_and_not_on_a_causal_lm(tokenizer):
    """On a classifier the gradient before any step is shaped by the random head (measured 16× the knee):
    the reading comes with a warning; on a causal LM, whose head is the pretrained one, it does not."""
    import warnings

    from transformers import LlamaForSequenceClassification

    batch = tokenizer(["the cat sat on the mat", "a dog ran in the park"], return_tensors="pt", padding=True)
    causal = dict(batch, labels=batch["input_ids"].clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the causal LM's probe
        probe_rank(tiny_llama(), [causal], steps=1)

    torch.manual_seed(0)
    config = tiny_llama().config
    config.num_labels = 2
    classifier = LlamaForSequenceClassification(config)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    with pytest.warns(UserWarning, match="LlamaForSequenceClassification is not a causal LM"):
        probe = probe_rank(classifier, [dict(batch, labels=torch.tensor([0, 1]))], steps=1)
    assert probe.rank >= 1  # the reading is still returned


def test_a_model_that_gives_no_gradient_or_no_spectrum_gets_no_rank(tokenizer, tmp_path, capsys):
    # Weights all zero: every target's gradient is zero and every layer's spectrum is empty. A rank read from
    # that (probe_rank r=0; allocate_ranks the same score and so the same rank everywhere) is no advice.
    from lora_monitor.edit import calibration_batches

    zero = tiny_llama()
    with torch.no_grad():
        for parameter in zero.parameters():
            parameter.zero_()
    with pytest.raises(LoraMonitorError, match="no target weight received a gradient over 2 batch"):
        probe_rank(zero, calibration_batches(SENTENCES[:4], tokenizer, batch_size=2), steps=2)
    with pytest.raises(LoraMonitorError, match="power-law fit failed on every one of the 14 layer"):
        allocate_ranks(zero)
    zero.save_pretrained(tmp_path / "zero")
    assert main(["allocate", str(tmp_path / "zero")]) == 2
    captured = capsys.readouterr()
    assert "power-law fit failed on every one" in captured.err and "rank_pattern" not in captured.out
