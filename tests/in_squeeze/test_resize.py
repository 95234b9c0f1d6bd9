"""lora_monitor.resize on real PEFT models, checked against dense float64 SVDs and least-squares maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from tiny_models import peft_llama, tiny_conv_net, tiny_llama

from lora_monitor import LoraMonitorError, find_lora_modules, load_adapter
from lora_monitor.adapters import pattern_key
from lora_monitor.in_squeeze import (
    compact_masks,
    current_ranks,
    install_rank_hooks,
    resize_lora_module,
    squeeze_model,
)

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _dense_deltas(model) -> dict[str, torch.Tensor]:
    return {r.name: r.scale * r.B.double() @ r.A.double() for r in find_lora_modules(model)}


def _best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _adam_step(model, optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_resize_is_the_best_rank_k_delta_with_the_scale_kept(tmp_path, use_rslora):
    model = peft_llama(r=16, lora_alpha=32, use_rslora=use_rslora).double()
    before = _dense_deltas(model)
    scales = {r.name: r.scale for r in find_lora_modules(model)}

    events = squeeze_model(model, 4)

    assert len(events) == 14 and all(e.old_rank == 16 and e.new_rank == 4 for e in events)
    after = _dense_deltas(model)
    for record in find_lora_modules(model):
        assert record.rank == 4 and record.A_shape == (4, record.A_shape[1])
        assert record.scale == pytest.approx(scales[record.name], rel=1e-12)
        reference = _best_rank_k(before[record.name], 4)
        assert torch.allclose(after[record.name], reference, atol=1e-10 * before[record.name].abs().max())
        S = torch.linalg.svdvals(before[record.name])
        event = next(e for e in events if e.name == record.name)
        assert event.retained_variance == pytest.approx(float((S[:4] ** 2).sum() / (S**2).sum()), rel=1e-8)
    config = model.peft_config["default"]
    # Every module shares rank 4: the config says so in r, with the alpha that keeps each scale, no patterns.
    expected_alpha = 32 * (math.sqrt(4 / 16) if use_rslora else 4 / 16)
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (
        4,
        expected_alpha,
        {},
        {},
    )

    # Saved and reloaded on a fresh base: same shapes, same scales, same weights, same function.
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"], written["alpha_pattern"]) == (
        4,
        expected_alpha,
        {},
        {},
    )
    saved = load_adapter(tmp_path)
    assert {m.rank for m in saved} == {4}
    reloaded = PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path).eval()
    _assert_same_adapter(reloaded, model, scales)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-10)


def _assert_same_adapter(reloaded, model, scales: dict[str, float]) -> None:
    """Every module of ``reloaded`` has the live model's rank and factors, and exactly the scale in ``scales``."""
    live = {r.name: r for r in find_lora_modules(model)}
    for record in find_lora_modules(reloaded):
        assert record.rank == live[record.name].rank
        assert record.module.scaling["default"] == scales[record.name]  # exactly: no rounding crept in
        assert torch.equal(record.B, live[record.name].B) and torch.equal(record.A, live[record.name].A)


def test_only_the_modules_that_differ_keep_a_pattern_entry(tmp_path):
    model = peft_llama(r=16, lora_alpha=32, rank_pattern={"k_proj": 8}).double()
    scales = {r.name: r.module.scaling["default"] for r in find_lora_modules(model)}
    untouched = "model.layers.1.mlp.down_proj"
    squeeze_model(model, {r.name: 4 for r in find_lora_modules(model) if r.name != untouched})

    config = model.peft_config["default"]
    # 13 modules at rank 4 (k_proj from 8, with the alpha that keeps its scale 32/8, the rest 32/16)
    assert (config.r, config.lora_alpha) == (4, 8)
    assert config.rank_pattern == {pattern_key(untouched): 16}
    k_projs = [r.name for r in find_lora_modules(model) if r.module_type == "k_proj"]
    assert config.alpha_pattern == {pattern_key(untouched): 32, **{pattern_key(name): 16 for name in k_projs}}
    model.save_pretrained(tmp_path)
    _assert_same_adapter(PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path), model, scales)


def test_a_resumed_squeezed_checkpoint_keeps_the_compact_config(tmp_path):
    model = peft_llama(r=16, lora_alpha=32).double()
    squeeze_model(model, 4, mode="mask")
    model.save_pretrained(tmp_path)
    for mode in ("mask", "resize"):
        fresh = peft_llama(r=16, lora_alpha=32).double()  # what a resumed run builds before loading
        install_rank_hooks(fresh, mode=mode)
        set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path)))
        config = fresh.peft_config["default"]
        assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (4, 8, {}, {})


def test_projected_adam_moments_follow_the_factor_maps():
    model = peft_llama(r=16).double()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-3)
    _adam_step(model, optimizer)
    _adam_step(model, optimizer, seed=1)
    record = next(r for r in find_lora_modules(model) if r.name == Q_PROJ)
    old_B, old_A = record.B.clone(), record.A.clone()
    old_B_param, old_A_param = record.module.lora_B["default"].weight, record.module.lora_A["default"].weight
    state_B = {k: v.clone() for k, v in optimizer.state[old_B_param].items()}
    state_A = {k: v.clone() for k, v in optimizer.state[old_A_param].items()}

    squeeze_model(model, {Q_PROJ: 5}, optimizer=optimizer)

    new_B_param, new_A_param = record.module.lora_B["default"].weight, record.module.lora_A["default"].weight
    # The maps, recovered independently by least squares: B_new = B map_B, A_new = map_A A.
    map_B = torch.linalg.pinv(old_B) @ new_B_param.detach()
    map_A = new_A_param.detach() @ torch.linalg.pinv(old_A)
    assert torch.allclose(old_B @ map_B, new_B_param.detach(), atol=1e-10)
    new_state_B, new_state_A = optimizer.state[new_B_param], optimizer.state[new_A_param]
    assert old_B_param not in optimizer.state and old_A_param not in optimizer.state
    assert torch.allclose(new_state_B["exp_avg"], state_B["exp_avg"] @ map_B, atol=1e-12)
    assert torch.allclose(new_state_B["exp_avg_sq"], state_B["exp_avg_sq"] @ map_B**2, atol=1e-12)
    assert torch.allclose(new_state_A["exp_avg"], map_A @ state_A["exp_avg"], atol=1e-12)
    assert torch.allclose(new_state_A["exp_avg_sq"], map_A**2 @ state_A["exp_avg_sq"], atol=1e-12)
    assert float(new_state_B["step"]) == float(state_B["step"]) == 2.0
    # Exactly the trainable parameters are optimized, and training goes on.
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in _trainable(model)}
    _adam_step(model, optimizer, seed=2)
    assert float(optimizer.state[new_B_param]["step"]) == 3.0


def test_reset_drops_the_optimizer_state_of_resized_factors():
    model = peft_llama(r=8)
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-3)
    _adam_step(model, optimizer)
    squeeze_model(model, 2, optimizer=optimizer, optimizer_state="reset")
    record = find_lora_modules(model)[0]
    assert record.module.lora_B["default"].weight not in optimizer.state
    assert record.module.lora_B["default"].weight.requires_grad
    _adam_step(model, optimizer, seed=1)
    assert optimizer.state[record.module.lora_B["default"].weight]["exp_avg"].shape == (64, 2)


def test_rsvd_resize_approximates_the_best_rank_k_delta():
    model = peft_llama(r=16).double()
    # A decaying spectrum, so that the randomized range finder has something to find.
    for record in find_lora_modules(model):
        with torch.no_grad():
            record.module.lora_B["default"].weight.mul_(0.5 ** torch.arange(16.0, dtype=torch.float64))
    before = _dense_deltas(model)
    optimizer = torch.optim.Adam(_trainable(model))
    _adam_step(model, optimizer)
    before = _dense_deltas(model)
    squeeze_model(model, 4, method="rsvd", optimizer=optimizer, rsvd_power_iters=2)
    after = _dense_deltas(model)
    for name, delta in before.items():
        reference = _best_rank_k(delta, 4)
        assert torch.linalg.norm(after[name] - reference) <= 1e-6 * torch.linalg.norm(delta)
    _adam_step(model, optimizer, seed=1)
    assert set(current_ranks(model).values()) == {4}


@pytest.mark.parametrize("mode", ["resize", "mask"])
def test_fp32_factors_are_resized_as_exactly_as_fp32_holds(mode):
    # B's directions span 1e-4: those weaker than √eps = 3.4e-4 of the strongest are below what a float32
    # Gram matrix resolves, so a float32 decomposition loses kept directions (a 1e-4 error). Decomposed in
    # float64 (the engine's rule for fp32 factors) the best rank-k delta comes back to the fp32 rounding.
    model = peft_llama(r=16, target_modules=["q_proj", "down_proj"])
    for record in find_lora_modules(model):
        with torch.no_grad():
            record.module.lora_B["default"].weight.mul_(torch.logspace(0, -4, 16))
    before = _dense_deltas(model)
    squeeze_model(model, 12, mode=mode)
    after = _dense_deltas(model)
    for name, delta in before.items():
        reference = _best_rank_k(delta, 12)
        assert torch.linalg.norm(after[name] - reference) <= 1e-6 * torch.linalg.norm(reference), name


def test_mask_mode_keeps_shapes_holds_zeros_and_saves_the_reduced_rank(tmp_path):
    model = peft_llama(r=16).double()  # no install_rank_hooks: a mask squeeze binds its own save hook
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
    _adam_step(model, optimizer)
    params_before = [id(p) for p in _trainable(model)]
    before = _dense_deltas(model)

    squeeze_model(model, 4, mode="mask", optimizer=optimizer)

    assert [id(p) for p in _trainable(model)] == params_before  # the parameter set never changes
    after = _dense_deltas(model)
    for name, delta in before.items():
        assert torch.allclose(after[name], _best_rank_k(delta, 4), atol=1e-10 * delta.abs().max())
    for _ in range(3):
        _adam_step(model, optimizer, seed=_)
    for record in find_lora_modules(model):
        B, A = record.module.lora_B["default"].weight, record.module.lora_A["default"].weight
        assert B.shape == (B.shape[0], 16) and A.shape[0] == 16
        assert B[:, 4:].abs().max() == 0 and A[4:].abs().max() == 0
        assert A[:4].abs().max() > 0
        assert optimizer.state[B]["exp_avg"][:, 4:].abs().max() == 0
        assert optimizer.state[A]["exp_avg_sq"][4:].abs().max() == 0
        assert torch.linalg.matrix_rank(record.B @ record.A) == 4
    assert set(current_ranks(model).values()) == {4}

    model.eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        live = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert {m.rank for m in load_adapter(tmp_path)} == {4}
    reloaded = PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, live, atol=1e-10)

    # The saved rank-4 adapter loads into a fresh full-rank model: mask mode pads, resize mode shrinks.
    for mode, nominal in (("mask", 16), ("resize", 4)):
        fresh = peft_llama(r=16).double()
        install_rank_hooks(fresh, mode=mode)
        set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path)))
        record = find_lora_modules(fresh)[0]
        assert record.module.lora_A["default"].weight.shape[0] == nominal  # the parameter itself
        assert record.rank == 4 and record.A.shape[0] == 4  # records show the live (kept) directions
        assert set(current_ranks(fresh).values()) == {4}
        with torch.no_grad():
            assert torch.allclose(fresh.eval()(input_ids=ids).logits, live, atol=1e-10)

    # Compacting after training: really smaller, the same function, the optimizer swapped too.
    events = compact_masks(model, optimizer=optimizer)
    assert len(events) == 14 and find_lora_modules(model)[0].A_shape[0] == 4
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, live, atol=1e-12)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in _trainable(model)}


def test_embedding_lora_resizes_and_reloads(tmp_path):
    model = peft_llama(r=8, target_modules=["embed_tokens", "q_proj"]).double()
    before = _dense_deltas(model)
    optimizer = torch.optim.AdamW(_trainable(model))
    _adam_step(model, optimizer)
    before = _dense_deltas(model)
    squeeze_model(model, 3, optimizer=optimizer)
    after = _dense_deltas(model)
    embedding = next(r for r in find_lora_modules(model) if r.kind == "embedding")
    assert embedding.rank == 3
    assert torch.allclose(after[embedding.name], _best_rank_k(before[embedding.name], 3), atol=1e-10)
    _adam_step(model, optimizer, seed=1)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path).eval()
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-10)


def test_conv_lora_resizes_to_the_best_rank_k_kernel(tmp_path):
    model = get_peft_model(
        tiny_conv_net().double(),
        LoraConfig(r=6, lora_alpha=12, target_modules=["conv1"], init_lora_weights=False),
    )
    record = find_lora_modules(model)[0]
    assert record.kind == "conv"
    before = record.scale * record.B @ record.A
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    squeeze_model(model, 2)
    record = find_lora_modules(model)[0]
    assert record.A_shape == (2, 3, 3, 3) and record.B_shape == (16, 2, 1, 1)
    assert torch.allclose(record.scale * record.B @ record.A, _best_rank_k(before, 2), atol=1e-10)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_conv_net().double(), tmp_path)
    assert torch.allclose(reloaded(x), model(x), atol=1e-10)


def test_reference_adapter_is_left_alone():
    model = peft_llama(r=8)
    model.add_adapter("ref", LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    ref_before = {r.name: r.A.clone() for r in find_lora_modules(model, "ref")}
    squeeze_model(model, 2)
    assert set(current_ranks(model).values()) == {2}
    for record in find_lora_modules(model, "ref"):
        assert record.rank == 8 and torch.equal(record.A, ref_before[record.name])
    with pytest.raises(LoraMonitorError, match="frozen reference"):
        resize_lora_module(find_lora_modules(model, "ref")[0].module, "ref", 2)


def test_bad_input_is_one_clear_error():
    model = peft_llama(r=8)
    record = find_lora_modules(model)[0]
    with pytest.raises(LoraMonitorError, match="at least 1"):
        resize_lora_module(record.module, "default", 0, name=record.name)
    with pytest.raises(LoraMonitorError, match="method"):
        resize_lora_module(record.module, "default", 2, method="svd")
    with pytest.raises(LoraMonitorError, match="no LoRA module named"):
        squeeze_model(model, {"model.layers.9.self_attn.q_proj": 2})
    # Options are checked even when nothing would be squeezed (every module is already at rank 8).
    for options, option in (
        ({"mode": "shrink"}, "mode"),
        ({"optimizer_state": "keep"}, "optimizer_state"),
        ({"min_variance_retention": 1.5}, "min_variance_retention"),
    ):
        with pytest.raises(LoraMonitorError, match=option):
            squeeze_model(model, 8, **options)
    with pytest.raises(LoraMonitorError, match="mode"):
        install_rank_hooks(model, mode="shrink")
    with torch.no_grad():
        record.module.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(LoraMonitorError, match=record.name):
        squeeze_model(model, 2)


def test_variance_threshold_gives_per_module_ranks(tmp_path):
    model = peft_llama(r=16).double()
    weights = {}
    for index, record in enumerate(find_lora_modules(model)):
        # Module i has a delta of exact rank 2 + i % 5 (the other directions are zeroed).
        live_rank = 2 + index % 5
        with torch.no_grad():
            record.module.lora_B["default"].weight[:, live_rank:] = 0
        weights[record.name] = live_rank
    events = squeeze_model(model, 1, min_variance_retention=0.999999)
    ranks = current_ranks(model)
    assert ranks == weights
    assert all(e.retained_variance == pytest.approx(1.0) for e in events)
    # Calling again with the same targets changes nothing.
    assert squeeze_model(model, 1, min_variance_retention=0.999999) == []
    # Per-module ranks survive a save and a reload on a fresh base (each pattern key hits one module).
    model.save_pretrained(tmp_path)
    assert {m.name: m.rank for m in load_adapter(tmp_path)} == weights
    reloaded = PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path)
    assert current_ranks(reloaded) == weights


def test_compressing_a_masked_live_model_keeps_every_scale(tmp_path):
    """A masked module is the adapter it saves as: compressing it must write the alpha of its kept rank."""
    from lora_monitor import compress_adapter

    model = peft_llama(r=16, lora_alpha=32).double()
    squeeze_model(model, {"model.layers.0.self_attn.q_proj": 8}, mode="mask")  # one module masked 16 → 8
    reference = {r.name: r.scale * r.B.double() @ r.A.double() for r in find_lora_modules(model)}
    compress_adapter(model, tmp_path / "compressed", target_rank=8)  # the masked one is already at 8
    reloaded = PeftModel.from_pretrained(tiny_llama(0).double(), tmp_path / "compressed")
    for record in find_lora_modules(reloaded):
        assert record.rank == 8
        assert record.scale == pytest.approx(32 / 16)  # α/r of the source, kept for every module
        if record.name == "model.layers.0.self_attn.q_proj":  # unchanged by compression: exactly its delta
            delta = record.scale * record.B.double() @ record.A.double()
            assert torch.allclose(delta, reference[record.name], atol=1e-12)


def test_a_merged_adapter_is_refused_and_its_base_weight_left_as_it_was():
    # Resizing the factors of a merged adapter would leave W + ΔW_old in the base at unmerge_adapter().
    from lora_monitor.monitor import Monitor

    model = peft_llama(r=8, lora_alpha=16)
    model.merge_adapter()
    merged = {name: p.detach().clone() for name, p in model.named_parameters()}
    for action in (lambda: squeeze_model(model, 4), lambda: Monitor().check(model, step=0)):
        with pytest.raises(LoraMonitorError, match=r"merged into its base weight \(merge_adapter\(\)\)"):
            action()
    assert all(torch.equal(p, merged[name]) for name, p in model.named_parameters())
    model.unmerge_adapter()
    assert squeeze_model(model, 4)  # unmerged, it resizes
