"""lora_monitor.metrics checked against dense float64 SVDs of the small ΔW of a real PEFT model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor.adapters import find_lora_modules
from lora_monitor.monitor.gradients import gradient_effective_ranks
from lora_monitor.monitor.history import MetricsHistory
from lora_monitor.monitor.metrics import (
    BaseNorm,
    BaseNormCache,
    ModuleMetrics,
    compute_module_metrics,
)
from lora_monitor.monitor.summary import summarize


def dense_effective_rank(S: torch.Tensor) -> float:
    p = S / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def dense_reference(module) -> dict[str, float]:
    """Every metric of one module from torch.linalg.svdvals in float64 of s·B@A, A, B and W_base."""
    A, B = module.A.double(), module.B.double()
    delta = module.scale * B @ A
    S = torch.linalg.svdvals(delta)[: module.rank]
    S_A, S_B = torch.linalg.svdvals(A), torch.linalg.svdvals(B)
    W = module.base_weight().double()
    S_W = torch.linalg.svdvals(W)
    return {
        "effective_rank": dense_effective_rank(S),
        "effective_rank_A": dense_effective_rank(S_A),
        "effective_rank_B": dense_effective_rank(S_B),
        "rank_utilization": dense_effective_rank(S) / module.rank,
        "stable_rank": float((S**2).sum() / S[0] ** 2),
        "kappa_A": float(S_A[0] / S_A[-1]),
        "kappa_B": float(S_B[0] / S_B[-1]),
        "sigma_max": float(S[0]),
        "frobenius": float(torch.linalg.matrix_norm(delta)),
        "base_sigma_max": float(S_W[0]),
        "base_frobenius": float(torch.linalg.matrix_norm(W)),
        "dominance": float(S[0] / S_W[0]),
        "update_scale": float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(W)),
    }


@pytest.fixture(scope="module")
def model():
    return peft_llama(r=8, lora_alpha=16, rank_pattern={"k_proj": 4})


@pytest.mark.slow
def test_every_metric_matches_dense_svd(model):
    modules = find_lora_modules(model)
    metrics = compute_module_metrics(modules, BaseNormCache())
    assert [m.name for m in metrics] == [m.name for m in modules]
    for module, record in zip(modules, metrics, strict=True):
        reference = dense_reference(module)
        assert not record.is_zero
        assert record.nominal_rank == module.rank
        assert record.numerical_rank == record.numerical_rank_A == record.numerical_rank_B == module.rank
        for key, expected in reference.items():
            # σmax of the base comes from a few power iterations (documented within 2%); the rest is exact.
            tolerance = 2e-2 if key in ("base_sigma_max", "dominance") else 1e-9
            assert getattr(record, key) == pytest.approx(expected, rel=tolerance), (module.name, key)
    # A rank-4 module batched with rank-8 ones: zero padding must not leak into its κ or ranks.
    k_proj = next(r for r in metrics if r.name.endswith("layers.0.self_attn.k_proj"))
    assert k_proj.nominal_rank == 4 and math.isfinite(k_proj.kappa_A) and k_proj.effective_rank <= 4


def test_condition_number_accurate_beyond_1e3():
    model = peft_llama(target_modules=["q_proj"])
    module = find_lora_modules(model)[0]
    generator = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 8, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -5, 8, dtype=torch.float64)  # κ(A) = 1e5
    with torch.no_grad():
        module.module.lora_A["default"].weight.copy_((U * singular_values) @ V.T)
    record = compute_module_metrics([module])[0]
    assert record.kappa_A == pytest.approx(1e5, rel=1e-3)
    assert record.kappa_A == pytest.approx(dense_reference(module)["kappa_A"], rel=1e-3)
    assert record.dominance is None and record.update_scale is None  # no base given


def test_zero_delta_is_flagged_not_healthy():
    model = peft_llama(init_lora_weights=True)  # PEFT's default: B = 0
    metrics = compute_module_metrics(find_lora_modules(model), BaseNormCache())
    for record in metrics:
        assert record.is_zero
        assert record.sigma_max == 0.0 and record.frobenius == 0.0 and record.dominance == 0.0
        for key in ("effective_rank", "rank_utilization", "stable_rank", "kappa_A", "kappa_B"):
            assert math.isnan(getattr(record, key))
    summary = summarize(metrics)
    assert summary.overall.num_zero == len(metrics)
    assert summary.overall.metrics["effective_rank"].mean is None
    assert "lora/mean_effective_rank" not in summary.scalars()


def test_rank_deficient_factor_has_infinite_kappa():
    model = peft_llama(target_modules=["v_proj"])
    module = find_lora_modules(model)[0]
    with torch.no_grad():
        module.module.lora_B["default"].weight[:, 5:] = 0
    record = compute_module_metrics([module])[0]
    assert math.isinf(record.kappa_B) and record.numerical_rank_B == 5 and record.numerical_rank == 5
    assert record.to_dict(json_safe=True)["kappa_B"] is None
    assert math.isinf(ModuleMetrics.from_dict(record.to_dict(json_safe=True)).kappa_B)


def test_scalars_leave_out_an_infinite_worst_kappa():
    """Loggers and strict JSON take finite numbers only: an infinite worst κ stays out of the scalars."""
    model = peft_llama(target_modules=["v_proj"])
    deficient, healthy = find_lora_modules(model)
    with torch.no_grad():
        deficient.module.lora_B["default"].weight[:, 5:] = 0
    metrics = compute_module_metrics([deficient, healthy])
    summary = summarize(metrics)
    scalars = summary.scalars()
    assert "lora/max_kappa_B" not in scalars
    assert all(math.isfinite(value) for value in scalars.values())
    json.dumps(scalars, allow_nan=False)
    # The mean is over the finite κ: the healthy module's, from a dense SVD of its B.
    S_B = torch.linalg.svdvals(healthy.B.double())
    assert scalars["lora/mean_kappa_B"] == pytest.approx(float(S_B[0] / S_B[-1]), rel=1e-9)
    assert scalars["lora/max_kappa_A"] == max(m.kappa_A for m in metrics)
    # The summary record still holds the infinite worst, as null in JSON.
    kappa_B = summary.to_dict()["overall"]["metrics"]["kappa_B"]
    assert kappa_B["worst"] is None and kappa_B["worst_module"] == deficient.name
    assert math.isinf(summary.overall.metrics["kappa_B"].worst)


def test_summary_follows_its_definition_with_ties_undefined_and_infinite_values(model):
    """Every group's mean and worst against the definition read literally: zero and non-finite modules
    left out, None and NaN left out, the mean over the finite values, the first of equal worsts named."""
    from lora_monitor.monitor.summary import LOWER_IS_WORSE, SUMMARIZED_METRICS

    base = compute_module_metrics(find_lora_modules(model), BaseNormCache())
    generator = torch.Generator().manual_seed(3)
    pool = [0.5, 2.0, 2.0, 7.0, math.inf, math.nan, None]  # repeated values make ties
    metrics = []
    for index, record in enumerate(base):
        picks = torch.randint(len(pool), (len(SUMMARIZED_METRICS),), generator=generator).tolist()
        changes = {metric: pool[pick] for metric, pick in zip(SUMMARIZED_METRICS, picks, strict=True)}
        metrics.append(replace(record, **changes, is_zero=index == 3, non_finite=index == 5))

    def literal(group: list[ModuleMetrics], metric: str):
        usable = [m for m in group if not m.is_zero and not m.non_finite]
        defined = [(getattr(m, metric), m.name) for m in usable]
        defined = [(v, name) for v, name in defined if v is not None and not math.isnan(v)]
        if not defined:
            return (None, None, None, 0)
        finite = [v for v, _ in defined if math.isfinite(v)]
        order = min if metric in LOWER_IS_WORSE else max
        worst = order(v for v, _ in defined)
        first = next(name for v, name in defined if v == worst)
        return (sum(finite) / len(finite) if finite else None, worst, first, len(defined))

    summary = summarize(metrics)
    groups = {"overall": (summary.overall, metrics)}
    for block, group in summary.by_block.items():
        groups[block] = (group, [m for m in metrics if m.block == block])
    for layer, group in summary.by_layer.items():
        groups[f"layer {layer}"] = (group, [m for m in metrics if m.layer_index == layer])
    assert len(groups) == 5
    for label, (group, members) in groups.items():
        assert group.num_modules == len(members) and group.num_zero == sum(m.is_zero for m in members)
        for metric in SUMMARIZED_METRICS:
            found = group.metrics[metric]
            assert (found.mean, found.worst, found.worst_module, found.count) == literal(members, metric), (
                label,
                metric,
            )


def test_base_norms_are_computed_once_per_module(model):
    modules = find_lora_modules(model)
    reads = []
    base_weights = {m.name: m.base_weight() for m in modules}

    def weight_for(name):
        reads.append(name)
        return base_weights[name]

    cache = BaseNormCache(weight_for)
    first = compute_module_metrics(modules, cache)
    second = compute_module_metrics(modules, cache)
    assert sorted(reads) == sorted(base_weights) and len(cache) == len(modules)
    assert [r.dominance for r in first] == [r.dominance for r in second]
    # A plain mapping of BaseNorm works too (the CLI's route for a saved adapter).
    mapping = {
        m.name: BaseNorm(r.base_sigma_max, r.base_frobenius) for m, r in zip(modules, first, strict=True)
    }
    assert [r.update_scale for r in compute_module_metrics(modules, mapping)] == [
        r.update_scale for r in first
    ]


def test_summary_mean_worst_per_type_and_layer(model):
    metrics = compute_module_metrics(find_lora_modules(model), BaseNormCache())
    summary = summarize(metrics)
    ranks = [m.effective_rank for m in metrics]
    overall = summary.overall.metrics
    assert overall["effective_rank"].mean == pytest.approx(sum(ranks) / len(ranks))
    assert overall["effective_rank"].worst == min(ranks)
    assert overall["dominance"].worst == max(m.dominance for m in metrics)
    assert overall["kappa_A"].worst_module == max(metrics, key=lambda m: m.kappa_A).name
    attention = [m for m in metrics if m.is_attention]
    assert summary.by_block["attention"].num_modules == len(attention) == 8
    assert summary.by_block["mlp"].num_modules == 6
    assert summary.by_block["mlp"].metrics["rank_utilization"].worst == min(
        m.rank_utilization for m in metrics if not m.is_attention
    )
    assert set(summary.by_layer) == {0, 1}
    layer_1 = [m for m in metrics if m.layer_index == 1]
    assert summary.by_layer[1].metrics["dominance"].mean == pytest.approx(
        sum(m.dominance for m in layer_1) / len(layer_1)
    )
    scalars = summary.scalars()
    assert scalars["lora/min_rank_utilization"] == min(m.rank_utilization for m in metrics)
    assert scalars["lora/max_dominance"] == max(m.dominance for m in metrics)
    assert scalars["lora/attention/max_dominance"] == max(m.dominance for m in attention)


def test_gradient_effective_rank_matches_dense_first_order_update():
    model = peft_llama(target_modules=["q_proj", "down_proj"])
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    modules = find_lora_modules(model)
    ranks = gradient_effective_ranks(modules)
    assert set(ranks) == {m.name for m in modules}
    for module in modules:
        layer = module.module
        grad_A = layer.lora_A["default"].weight.grad.double()
        grad_B = layer.lora_B["default"].weight.grad.double()
        step = module.scale * (grad_B @ module.A.double() + module.B.double() @ grad_A)
        S = torch.linalg.svdvals(step)[: 2 * module.rank]
        assert ranks[module.name] == pytest.approx(dense_effective_rank(S), rel=1e-4)  # float32 default
        exact = gradient_effective_ranks([module], dtype=torch.float64)[module.name]
        assert exact == pytest.approx(dense_effective_rank(S), rel=1e-8)
    model.zero_grad(set_to_none=True)
    assert gradient_effective_ranks(modules) == {}


def _series_record(template: ModuleMetrics, effective_rank: float, kappa: float = 2.0) -> ModuleMetrics:
    return replace(
        template,
        effective_rank=effective_rank,
        rank_utilization=effective_rank / template.nominal_rank,
        kappa_A=kappa,
    )


def test_history_trend_saturation_and_volatility(model):
    template = compute_module_metrics(find_lora_modules(model)[:1])[0]
    name = template.name

    rising = MetricsHistory()
    for step, rank in zip((10, 20, 30, 40), (2.0, 3.0, 4.0, 5.0), strict=True):
        rising.add(step, [_series_record(template, rank)])
    assert rising.dynamics(name).trend == "increasing"
    assert rising.dynamics(name).saturated_since is None

    falling = MetricsHistory()
    for step, rank in zip((10, 20, 30), (6.0, 4.0, 2.0), strict=True):
        falling.add(step, [_series_record(template, rank, kappa=10.0**step)])
    dynamics = falling.dynamics(name)
    assert dynamics.trend == "collapsing"
    assert dynamics.kappa_A_volatility == pytest.approx(
        torch.tensor([10.0, 20.0, 30.0]).std(unbiased=False).item()
    )

    plateau = MetricsHistory(saturation_checks=3, saturation_tolerance=0.02)
    for step, rank in zip((10, 20, 30, 40, 50), (3.0, 5.0, 6.0, 6.05, 6.02), strict=True):
        plateau.add(step, [_series_record(template, rank)])
    dynamics = plateau.dynamics(name)
    assert dynamics.saturated_since == 30 and dynamics.steps_to_saturation == 20
    assert dynamics.trend == "increasing"  # over the window it still rose

    zero = MetricsHistory()
    zero.add(0, [replace(template, is_zero=True, effective_rank=math.nan)])
    assert zero.dynamics(name).trend is None and zero.dynamics(name).checks == 0


def _brute_force_saturated_since(values: list[float], steps: list[int], tolerance: float, checks: int):
    """The definition, read literally: the earliest start of an unchanged run ending at the latest check."""
    for start in range(len(values)):
        window = values[start:]
        if max(window) - min(window) <= tolerance * max(abs(v) for v in window):
            return steps[start] if len(window) >= checks else None
    return None


def test_saturation_follows_its_definition_at_every_check(model):
    """Plateaus that form, drift out of tolerance and form again, asked at every check (as a monitor every
    step does) and with a check replaced at the same step: the incremental run agrees with the definition."""
    template = compute_module_metrics(find_lora_modules(model)[:1])[0]
    generator = torch.Generator().manual_seed(3)
    history = MetricsHistory(saturation_checks=4, saturation_tolerance=0.02)
    values, steps = [], []
    level = 5.0
    for step in range(1, 301):
        if step % 37 == 0:
            level *= 1.1  # a jump breaks the plateau
        level *= 1 + 0.004 * float(torch.randn((), generator=generator))  # drift, sometimes out of 2%
        history.add(step, [_series_record(template, level)])
        values.append(level)
        steps.append(step)
        expected = _brute_force_saturated_since(values, steps, 0.02, 4)
        assert history.saturated_since(template.name) == expected, step
        if step % 50 == 0:  # the same step checked again with another value replaces the first
            values[-1] = level * 1.5
            history.add(step, [_series_record(template, values[-1])])
            assert history.saturated_since(template.name) == _brute_force_saturated_since(
                values, steps, 0.02, 4
            )
    assert any(_brute_force_saturated_since(values[:n], steps[:n], 0.02, 4) for n in range(4, 300))


def test_a_resized_module_starts_its_dynamics_over(model):
    """After a resize (In-Squeeze, rank 16 → 8) its utilization jumps; only the rank-8 checks count."""
    template = compute_module_metrics(find_lora_modules(model)[:1])[0]
    name = template.name
    history = MetricsHistory(saturation_checks=3)
    wide, narrow = replace(template, nominal_rank=16), replace(template, nominal_rank=8)
    for step in (10, 20):  # effective rank 7: utilization 0.44 at rank 16, and a different κ(A)
        history.add(step, [_series_record(wide, 7.0, kappa=1e4)])
    for step in (30, 40, 50):  # the same effective rank after the cut: utilization 0.875, flat
        history.add(step, [_series_record(narrow, 7.0, kappa=10.0)])
    dynamics = history.dynamics(name)
    assert dynamics.trend == "stable" and dynamics.rank_utilization_change == pytest.approx(0.0)
    assert dynamics.saturated_since == 30  # not 10: the rank-16 checks are another adapter
    assert dynamics.kappa_A_volatility == pytest.approx(0.0)
    assert dynamics.checks == 5
    # Over every check, rank-blind, the same numbers would read as a rising utilization.
    everything = history.series(name, "rank_utilization")
    assert [value for _, value in everything] == pytest.approx([7 / 16, 7 / 16, 7 / 8, 7 / 8, 7 / 8])
    assert history.latest_rank(name) == 8
    assert history.current_series(name) == [(30, 7.0), (40, 7.0), (50, 7.0)]
    # Two checks at the new rank are not yet a trend at all.
    fresh = MetricsHistory()
    fresh.add(10, [_series_record(wide, 7.0)])
    fresh.add(20, [_series_record(wide, 7.0)])
    fresh.add(30, [_series_record(narrow, 7.0)])
    assert fresh.dynamics(name).trend is None


# ---- lora-monitor analyze ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking adapter, the live model it came from, and its base model, all saved."""
    from tiny_models import tiny_llama

    folder = tmp_path_factory.mktemp("analyze")
    live = peft_llama(seed=0, target_modules=["q_proj", "v_proj", "down_proj"])
    live.save_pretrained(folder / "adapter")
    tiny_llama(seed=0).save_pretrained(folder / "base")  # the same base weights as the live model's
    tiny_llama(seed=0, hidden_size=32).save_pretrained(folder / "other_base")
    return folder, live


def test_analyze_json_matches_the_live_model(saved, capsys):
    import json

    from lora_monitor.cli import main

    folder, live = saved
    assert main(["analyze", str(folder / "adapter"), "--base", str(folder / "base"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = {m.name: m for m in compute_module_metrics(find_lora_modules(live), BaseNormCache())}
    assert sorted(m["name"] for m in report["modules"]) == sorted(expected)
    for got in report["modules"]:
        want = expected[got["name"]]
        for key in ("effective_rank", "rank_utilization", "stable_rank", "kappa_A", "kappa_B", "frobenius"):
            assert got[key] == pytest.approx(getattr(want, key), rel=1e-9), key
        assert got["dominance"] == pytest.approx(want.dominance, rel=1e-6)
        assert got["update_scale"] == pytest.approx(want.update_scale, rel=1e-6)
    assert {alert["code"] for alert in report["alerts"]} == {"adapter_dominance", "update_scale_too_large"}
    assert report["summary"]["overall"]["num_modules"] == 6

    assert main(["analyze", str(folder / "adapter"), "--json"]) == 0
    without_base = json.loads(capsys.readouterr().out)
    assert all(m["dominance"] is None for m in without_base["modules"])
    assert without_base["alerts"] == []


def test_analyze_table_and_bad_input(saved, capsys, tmp_path):
    from lora_monitor.cli import main

    folder, _ = saved
    assert main(["analyze", str(folder / "adapter"), "--base", str(folder / "base")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "dominance" in out
    assert "CRITICAL adapter_dominance" in out and "Suggested action" in out

    assert main(["analyze", str(folder / "adapter"), "--base", str(folder / "other_base")]) == 2
    assert "model.layers.0.mlp.down_proj has a base weight of shape" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err

    peft_llama(init_lora_weights=True).save_pretrained(tmp_path / "fresh")
    assert main(["analyze", str(tmp_path / "fresh")]) == 0
    out = capsys.readouterr().out
    assert "zero ΔW" in out and "No alerts." in out


def test_analyze_names_the_first_three_broken_modules_and_counts_the_rest(capsys, tmp_path):
    from lora_monitor.cli import main

    live = peft_llama(seed=0, target_modules=["q_proj", "v_proj", "down_proj"])  # 6 modules, 2 layers
    broken = [name for name, _ in live.named_modules() if name.endswith(("q_proj", "v_proj", "down_proj"))]
    with torch.no_grad():
        for name in broken[:5]:
            live.get_submodule(name).lora_B["default"].weight[0, 0] = math.nan
    live.save_pretrained(tmp_path / "adapter")
    assert main(["analyze", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    first = ", ".join(sorted(name.removeprefix("base_model.model.") for name in broken[:5])[:3])  # file order
    assert f": module {first} and 2 more has NaN/Inf values in its LoRA factors; " in err
    assert err.count("\n") == 1 and "Traceback" not in err
