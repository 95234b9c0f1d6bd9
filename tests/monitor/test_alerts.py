"""Each alert rule made to fire by a constructed adapter in a real PEFT model, and not on a healthy one."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor.adapters import find_lora_modules
from lora_monitor.errors import LoraMonitorError
from lora_monitor.monitor.alerts import AlertMonitor, AlertThresholds, Severity, check_alerts
from lora_monitor.monitor.history import MetricsHistory
from lora_monitor.monitor.metrics import BaseNormCache, compute_module_metrics

HISTORY_CODES = {"early_rank_collapse", "rank_saturated"}


def healthy_model():
    """Full-rank, well-conditioned factors and a small update (dominance ≈ 0.05-0.1)."""
    model = peft_llama(r=8, lora_alpha=16)
    with torch.no_grad():
        for module in find_lora_modules(model):
            module.module.lora_B["default"].weight.mul_(0.01)
    return model


def module_named(model, suffix):
    return next(m for m in find_lora_modules(model) if m.name.endswith(suffix))


def measure(model, cache):
    return compute_module_metrics(find_lora_modules(model), cache)


def codes(alerts):
    return {(a.code, a.severity) for a in alerts}


def set_rank_one(module):
    with torch.no_grad():
        B = module.module.lora_B["default"].weight
        B[:, 1:] = 0  # B·A = b₁ a₁ᵀ: rank 1


def test_healthy_adapter_raises_nothing_even_with_a_history():
    model = healthy_model()
    modules = find_lora_modules(model)
    originals = {m.name: m.B.clone() for m in modules}
    cache = BaseNormCache()
    monitor = AlertMonitor()
    history = MetricsHistory()
    for check, step in enumerate((10, 20, 30, 40, 50, 60)):
        # A training-like evolution: the adapter spreads its update over more directions at every check.
        profile = (0.55 + 0.09 * check) ** torch.arange(8.0)
        with torch.no_grad():
            for module in modules:
                module.module.lora_B["default"].weight.copy_(originals[module.name] * profile)
        metrics = measure(model, cache)
        history.add(step, metrics)
        assert monitor.update(metrics, history, step) == []
    assert max(m.dominance for m in metrics) < 0.3
    assert {history.dynamics(m.name).trend for m in metrics} == {"increasing"}
    assert monitor.alerts == []


def test_zero_delta_raises_nothing_but_dead_adapter_once_its_steps_passed():
    model = peft_llama(init_lora_weights=True)
    cache = BaseNormCache()
    history = MetricsHistory()
    monitor = AlertMonitor({"update_scale_low_after_steps": 0, "dead_adapter_steps": 300})
    for step in range(0, 600, 100):
        metrics = measure(model, cache)
        history.add(step, metrics)
        new = monitor.update(metrics, history, step)
        if step < 300:
            assert new == []
        elif step == 300:  # B still exactly zero after 300 steps: every module, once
            assert codes(new) == {("dead_adapter", Severity.CRITICAL)}
            assert (
                set(new[0].modules) == {m.name for m in metrics}
                and "B is still exactly zero" in new[0].message
            )
        else:
            assert new == []


@pytest.mark.slow
def test_rank_one_product_raises_low_effective_rank():
    model = healthy_model()
    module = module_named(model, "layers.0.self_attn.q_proj")
    set_rank_one(module)
    alerts = check_alerts(measure(model, BaseNormCache()), step=10)
    # B now has 7 zero directions: κ(B) = inf, which the conditioning rule reports as well.
    assert codes(alerts) == {("low_effective_rank", Severity.WARNING), ("ill_conditioned", Severity.WARNING)}
    assert all(a.modules == (module.name,) for a in alerts)
    alert = next(a for a in alerts if a.code == "low_effective_rank")
    assert "rank-deficient" in next(a for a in alerts if a.code == "ill_conditioned").message
    assert alert.modules == (module.name,)
    assert alert.values[module.name] == pytest.approx(1 / 8)
    assert "less than 25% of their configured rank" in alert.message and module.name in alert.message
    assert "rank" in alert.action


@pytest.mark.slow
def test_ill_conditioned_factor_raises_ill_conditioned():
    model = healthy_model()
    module = module_named(model, "layers.1.mlp.up_proj")
    with torch.no_grad():
        A = module.module.lora_A["default"].weight
        U, _, Vh = torch.linalg.svd(A, full_matrices=False)
        A.copy_(U @ torch.diag(torch.logspace(0, -4, 8)) @ Vh)  # κ(A) = 1e4
    alerts = check_alerts(measure(model, BaseNormCache()))
    ill = [a for a in alerts if a.code == "ill_conditioned"]
    assert len(ill) == 1 and ill[0].modules == (module.name,)
    assert ill[0].values[module.name] == pytest.approx(1e4, rel=1e-3)
    assert "learning rate" in ill[0].action


def test_huge_B_raises_dominance_and_scale_mismatch_with_severities():
    model = healthy_model()
    huge = module_named(model, "layers.0.mlp.down_proj")
    medium = module_named(model, "layers.1.self_attn.v_proj")
    cache = BaseNormCache()
    dominance = {m.name: m.dominance for m in measure(model, cache)}
    with torch.no_grad():
        huge.module.lora_B["default"].weight.mul_(100)
        medium.module.lora_B["default"].weight.mul_(0.4 / dominance[medium.name])  # ρ = 0.4
    alerts = check_alerts(measure(model, cache))
    by_key = {(a.code, a.severity): a for a in alerts}
    assert by_key[("adapter_dominance", Severity.CRITICAL)].modules == (huge.name,)
    assert by_key[("adapter_dominance", Severity.WARNING)].modules == (medium.name,)
    assert by_key[("adapter_dominance", Severity.WARNING)].values[medium.name] == pytest.approx(0.4)
    assert by_key[("update_scale_too_large", Severity.WARNING)].modules == (huge.name,)
    assert set(by_key) == {
        ("adapter_dominance", Severity.CRITICAL),
        ("adapter_dominance", Severity.WARNING),
        ("update_scale_too_large", Severity.WARNING),
    }


def test_tiny_update_raises_scale_mismatch_only_after_warmup():
    model = healthy_model()
    module = module_named(model, "layers.0.self_attn.k_proj")
    with torch.no_grad():
        module.module.lora_B["default"].weight.mul_(1e-4)
    metrics = measure(model, BaseNormCache())
    assert check_alerts(metrics, step=50) == []
    late = check_alerts(metrics, step=500)
    assert codes(late) == {("update_scale_too_small", Severity.INFO)} and late[0].modules == (module.name,)


def test_early_collapse_needs_a_history_and_the_first_100_steps():
    model = healthy_model()
    module = module_named(model, "layers.1.self_attn.o_proj")
    cache = BaseNormCache()
    before = measure(model, cache)
    set_rank_one(module)
    after = measure(model, cache)

    assert "early_rank_collapse" not in {a.code for a in check_alerts(after)}  # no history: waits

    history = MetricsHistory()
    history.add(20, before)
    history.add(60, after)
    alerts = [a for a in check_alerts(after, history, step=60) if a.code == "early_rank_collapse"]
    assert len(alerts) == 1 and alerts[0].modules == (module.name,)
    assert alerts[0].values[module.name] > 0.5

    late = MetricsHistory()
    late.add(200, before)
    late.add(300, after)
    assert "early_rank_collapse" not in {a.code for a in check_alerts(after, late, step=300)}


@pytest.mark.slow
def test_saturation_after_k_unchanged_checks():
    model = healthy_model()
    cache = BaseNormCache()
    metrics = measure(model, cache)
    history = MetricsHistory()
    limits = AlertThresholds(saturation_checks=4)
    for check, step in enumerate((10, 20, 30, 40)):
        history.add(step, metrics)
        saturated = [a for a in check_alerts(metrics, history, limits, step) if a.code == "rank_saturated"]
        if check < 3:
            assert saturated == []  # waits for K checks
    assert len(saturated) == 1 and saturated[0].severity == Severity.INFO
    assert set(saturated[0].modules) == {m.name for m in metrics}


def test_alerts_are_raised_once_per_rule_and_module():
    model = healthy_model()
    first = module_named(model, "layers.0.self_attn.q_proj")
    second = module_named(model, "layers.1.mlp.gate_proj")
    cache = BaseNormCache()
    monitor = AlertMonitor({"max_condition_number": math.inf})  # rank-one B: leave κ = inf out of this test
    set_rank_one(first)
    raised = monitor.update(measure(model, cache), step=10)
    assert [(a.code, a.modules) for a in raised] == [("low_effective_rank", (first.name,))]
    assert monitor.update(measure(model, cache), step=20) == []  # same condition, same module
    set_rank_one(second)
    raised = monitor.update(measure(model, cache), step=30)
    assert [(a.code, a.modules) for a in raised] == [("low_effective_rank", (second.name,))]
    assert first.name not in raised[0].message
    assert monitor.counts == {"low_effective_rank/warning": 2}
    assert [a.step for a in monitor.alerts] == [10, 30]


def test_thresholds_are_configurable():
    metrics = measure(healthy_model(), BaseNormCache())
    assert check_alerts(metrics) == []
    strict = check_alerts(metrics, thresholds={"dominance_warning": 0.01, "dominance_critical": 0.02})
    assert codes(strict) == {("adapter_dominance", Severity.CRITICAL)}
    with pytest.raises(LoraMonitorError, match="dominance_warnin"):
        AlertThresholds.from_value({"dominance_warnin": 0.1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dominance_warning": "0.2"}, "dominance_warning must be a number, got '0.2'"),  # as a config may
        ({"saturation_checks": 2.5}, "saturation_checks must be a whole number, got 2.5"),
        ({"early_collapse_steps": True}, "early_collapse_steps must be a whole number, got True"),
        ({"max_condition_number": -5.0}, "max_condition_number must be at least 1, got -5.0"),
        ({"saturation_tolerance": math.nan}, "saturation_tolerance must be a finite number, got nan"),
        ({"low_rank_fraction": 1.5}, "low_rank_fraction must be at least 0 and at most 1, got 1.5"),
        ({"update_scale_high": 0.0}, "update_scale_high must be above 0, got 0.0"),
        ({"dominance_warning": 0.6}, "dominance_warning=0.6 must not exceed dominance_critical=0.5"),
    ],
)
def test_bad_thresholds_are_rejected_with_their_name_and_value(overrides, message):
    for make in (AlertThresholds.from_value, lambda values: AlertThresholds(**values)):
        with pytest.raises(LoraMonitorError) as raised:
            make(overrides)
        assert message in str(raised.value)
    with pytest.raises(LoraMonitorError, match=r"unknown alert threshold\(s\) \['extra'\]"):
        AlertThresholds.from_value({**overrides, "extra": 1})


def test_valid_thresholds_are_kept():
    limits = AlertThresholds.from_value({"max_condition_number": math.inf, "saturation_checks": 3})
    assert limits.max_condition_number == math.inf and limits.saturation_checks == 3
    assert AlertThresholds(dominance_warning=0.5, dominance_critical=0.5).dominance_warning == 0.5
    with pytest.raises(LoraMonitorError, match="dict of overrides"):
        AlertThresholds.from_value([("dominance_warning", 0.2)])


def test_saturation_counts_only_the_checks_at_the_current_rank():
    """The saturation rule uses MetricsHistory.saturated_since: a resize starts the count over."""
    from dataclasses import replace

    metrics = measure(healthy_model(), BaseNormCache())
    limits = AlertThresholds(saturation_checks=3)
    history = MetricsHistory()
    history.add(10, metrics)
    history.add(20, metrics)
    # Cut to rank 4 with the same effective rank (all checks unchanged): only the rank-4 checks count.
    squeezed = [replace(m, nominal_rank=4, rank_utilization=m.effective_rank / 4) for m in metrics]
    fired = []
    for step in (30, 40, 50):
        history.add(step, squeezed)
        alerts = check_alerts(squeezed, history, limits, step)
        fired.append(any(a.code == "rank_saturated" for a in alerts))
    assert fired == [False, False, True]
    assert history.saturated_since(metrics[0].name, checks=3) == 30


def test_a_resized_module_starts_a_new_history():
    """A rank cut (In-Squeeze) is a decision, not a collapse: history rules only compare equal ranks."""
    from dataclasses import replace

    metrics = measure(healthy_model(), BaseNormCache())
    history = MetricsHistory()
    history.add(10, metrics)
    squeezed = [replace(m, nominal_rank=2, effective_rank=1.8, rank_utilization=0.9) for m in metrics]
    history.add(20, squeezed)
    assert "early_rank_collapse" not in {a.code for a in check_alerts(squeezed, history, step=20)}
    collapsed = [replace(m, effective_rank=1.8, rank_utilization=1.8 / m.nominal_rank) for m in metrics]
    history.add(30, collapsed)
    assert "early_rank_collapse" in {a.code for a in check_alerts(collapsed, history, step=30)}


def _saturated_since_by_definition(points, tolerance, checks):
    """The definition, checked window by window from scratch: the first step of the longest run of
    finite values ending at the last point whose spread is at most tolerance × max |value|."""
    values = [value for _, value in points]
    if len(values) < checks:
        return None
    start = len(values) - 1
    while start > 0:
        window = values[start - 1 :]
        if not all(math.isfinite(v) for v in window):
            break
        if max(window) - min(window) > tolerance * max(abs(v) for v in window):
            break
        start -= 1
    return points[start][0] if len(values) - start >= checks else None


@pytest.mark.parametrize("seed", range(4))
def test_saturation_and_early_collapse_kept_as_checks_arrive_equal_their_definition(seed):
    """The history updates its derived numbers from new checks only; after every check they equal the
    from-scratch definition (plateaus, jumps, a resize, a return to the first rank)."""
    from dataclasses import replace

    generator = torch.Generator().manual_seed(seed)
    template = measure(healthy_model(), BaseNormCache())[0]
    history = MetricsHistory()
    limits = AlertThresholds(saturation_checks=3, saturation_tolerance=0.05, early_collapse_steps=120)
    value, seen = 4.0, {}
    for step in range(10, 400, 10):
        jump = float(torch.rand(1, generator=generator))
        value = value * (1 + 0.3 * (jump - 0.5)) if jump > 0.6 else value * (1 + 0.01 * (jump - 0.3))
        rank = 4 if 150 <= step < 220 else 8  # resized, then back
        record = replace(template, nominal_rank=rank, effective_rank=value, rank_utilization=value / rank)
        history.add(step, [record])
        seen.setdefault(rank, []).append((step, value))
        points = seen[rank]
        for tolerance, checks in ((0.05, 3), (0.02, 5)):
            expected = _saturated_since_by_definition(points, tolerance, checks)
            assert history.saturated_since(template.name, tolerance=tolerance, checks=checks) == expected
        early = [v for s, v in points if s <= limits.early_collapse_steps]
        peak_at = max(range(len(early)), key=early.__getitem__) if early else 0
        after = early[peak_at + 1 :]
        expected_drop = 1 - min(after) / early[peak_at] if len(early) >= 2 and after else None
        drop = history.early_peak_drop(template.name, limits.early_collapse_steps)
        assert drop == pytest.approx(expected_drop) if expected_drop is not None else drop is None
