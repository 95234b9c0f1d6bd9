"""Post-Squeeze: analysis against dense SVD, compression round trips through PEFT, bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from dense_reference import (
    best_rank_k,
    decay_spectrum,
    dense_deltas,
    energy_retained,
    lora_layers,
    relative_error,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import peft_llama, tiny_conv_net, tiny_llama

from lora_monitor.adapters import write_adapter_folder
from lora_monitor.errors import LoraMonitorError
from lora_monitor.post_squeeze import analyze_adapter, compress_adapter, default_candidate_ranks
from lora_monitor.render.console import print_analysis

SEED = 0


def decaying_llama(dtype: torch.dtype | None = None, **lora_kwargs) -> torch.nn.Module:
    model = decay_spectrum(peft_llama(SEED, **lora_kwargs))
    return model.to(dtype) if dtype is not None else model


def saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def reload(folder: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    base = tiny_llama(SEED)
    if dtype is not None:
        base = base.to(dtype)
    return PeftModel.from_pretrained(base, folder).eval()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# ---- analysis ------------------------------------------------------------------------------------------


def test_analysis_matches_dense_svd():
    model = decaying_llama()
    analysis = analyze_adapter(model, min_variance_retention=0.9)
    deltas = dense_deltas(model)
    assert analysis.source_rank == 8
    assert analysis.candidate_ranks == [1, 2, 4, 8]
    assert analysis.num_modules == len(deltas) == 14
    assert analysis.zero_modules == []
    for record in analysis.modules:
        dense_S = torch.linalg.svdvals(deltas[record.name])[: record.rank]
        torch.testing.assert_close(
            torch.tensor(record.singular_values, dtype=torch.float64), dense_S, rtol=1e-5, atol=1e-9
        )
        assert record.energy == pytest.approx(float(deltas[record.name].norm() ** 2), rel=1e-5)
    for k in analysis.candidate_ranks:
        per_module = [energy_retained(delta, k) for delta in deltas.values()]
        energies = [float(delta.norm() ** 2) for delta in deltas.values()]
        assert analysis.mean_variance[k] == pytest.approx(sum(per_module) / len(per_module), rel=1e-5)
        assert analysis.min_variance[k] == pytest.approx(min(per_module), rel=1e-5)
        assert analysis.max_variance[k] == pytest.approx(max(per_module), rel=1e-5)
        weighted = sum(e * v for e, v in zip(energies, per_module, strict=True)) / sum(energies)
        assert analysis.weighted_variance[k] == pytest.approx(weighted, rel=1e-5)
    expected = next(k for k in analysis.candidate_ranks if analysis.mean_variance[k] >= 0.9)
    assert analysis.recommended_rank == expected
    assert 1 < expected < 8  # the decaying spectrum makes this a real choice
    # per-module minimal rank: the smallest k whose dense energy reaches the threshold
    for record in analysis.modules:
        dense = [energy_retained(deltas[record.name], k) for k in range(1, 9)]
        assert record.minimal_rank == next(k for k, v in enumerate(dense, 1) if v >= 0.9)
    # groups: q_proj over its two layers, attention vs mlp
    q_names = [name for name in deltas if name.endswith("q_proj")]
    q_mean = {k: sum(energy_retained(deltas[n], k) for n in q_names) / 2 for k in analysis.candidate_ranks}
    group = analysis.by_module_type["q_proj"]
    assert group.num_modules == 2
    assert group.mean_variance[2] == pytest.approx(q_mean[2], rel=1e-5)
    assert set(analysis.by_block) == {"attention", "mlp"}
    assert analysis.by_block["attention"].num_modules == 8
    assert set(analysis.by_layer) == {0, 1}
    # the data-free estimate: ‖ΔW‖²_F / ‖ΔW‖²_2 of each dense delta, averaged, rounded up
    stable = [float(d.norm() ** 2 / torch.linalg.matrix_norm(d, ord=2) ** 2) for d in deltas.values()]
    for record in analysis.modules:
        delta = deltas[record.name]
        assert record.stable_rank == pytest.approx(
            float(delta.norm() ** 2 / torch.linalg.matrix_norm(delta, ord=2) ** 2), rel=1e-5
        )
    assert analysis.mean_stable_rank == pytest.approx(sum(stable) / len(stable), rel=1e-5)
    assert analysis.stable_rank_estimate == math.ceil(sum(stable) / len(stable))
    assert 1 < analysis.mean_stable_rank < 8
    json.dumps(analysis.to_dict(), allow_nan=False)


def test_analysis_from_folder_equals_live_and_custom_ranks(tmp_path):
    model = decaying_llama(r=12, lora_alpha=24)
    folder = saved(model, tmp_path / "adapter")
    live = analyze_adapter(model)
    disk = analyze_adapter(folder, candidate_ranks=[3, 12, 5])
    assert default_candidate_ranks(12) == [1, 2, 4, 8, 12] == live.candidate_ranks
    assert disk.candidate_ranks == [3, 5, 12]
    assert disk.mean_variance[12] == pytest.approx(1.0)
    assert live.singular_values.keys() == disk.singular_values.keys()
    for name, values in live.singular_values.items():
        torch.testing.assert_close(torch.tensor(values), torch.tensor(disk.singular_values[name]))
    assert disk.to_dict()["mean_variance"]["3"] == pytest.approx(disk.mean_variance[3])


def test_zero_deltas_are_reported_not_counted_as_retained():
    model = peft_llama(SEED, init_lora_weights=True)  # B = 0 everywhere
    analysis = analyze_adapter(model)
    assert analysis.num_modules == 0
    assert len(analysis.zero_modules) == 14
    assert analysis.recommended_rank is None
    assert all(math.isnan(v) for v in analysis.mean_variance.values())
    assert math.isnan(analysis.mean_stable_rank) and analysis.stable_rank_estimate is None
    json.dumps(analysis.to_dict(), allow_nan=False)  # NaN is written as null
    # one trained module: the table is about that module only
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    analysis = analyze_adapter(model, min_variance_retention=0.5)
    assert analysis.num_modules == 1 and len(analysis.zero_modules) == 13
    delta = dense_deltas(model)["model.layers.0.self_attn.q_proj"]
    assert analysis.mean_variance[2] == pytest.approx(energy_retained(delta, 2), rel=1e-5)
    assert analysis.min_variance[2] == analysis.max_variance[2] == analysis.mean_variance[2]
    # the zero deltas are not averaged into the data-free estimate either
    assert analysis.mean_stable_rank == pytest.approx(
        float(delta.norm() ** 2 / torch.linalg.matrix_norm(delta, ord=2) ** 2), rel=1e-5
    )


def test_printed_table_marks_the_recommended_row():
    from rich.console import Console

    analysis = analyze_adapter(decaying_llama(), min_variance_retention=0.9)
    console = Console(record=True, width=120)
    print_analysis(analysis, console)
    text = console.export_text()
    marked = [line for line in text.splitlines() if "<--" in line]
    assert len(marked) == 1 and f" {analysis.recommended_rank} " in marked[0]
    assert f"Energy rank: {analysis.recommended_rank} " in text


# ---- compression round trips through PEFT ---------------------------------------------------------------

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {
        "rank_pattern": {"q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"v_proj": 4, "down_proj": 32},
    },
    "dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "embedding": {"target_modules": ["embed_tokens", "q_proj", "v_proj"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*VARIANTS, "bf16"])
def test_compressed_adapter_reloads_with_best_rank_k_deltas(tmp_path, variant):
    dtype = torch.bfloat16 if variant == "bf16" else None
    model = decaying_llama(dtype, **VARIANTS.get(variant, {}))
    source = saved(model, tmp_path / "adapter")
    before = folder_digest(source)
    k = 4
    result = compress_adapter(source, tmp_path / "squeezed", target_rank=k)
    assert folder_digest(source) == before  # the input is untouched
    reloaded = reload(tmp_path / "squeezed", dtype)

    original_deltas, new_deltas = dense_deltas(model), dense_deltas(reloaded)
    original_layers, new_layers = lora_layers(model), lora_layers(reloaded)
    assert set(new_deltas) == set(original_deltas)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 factors round at ~4e-3
    for name, delta in original_deltas.items():
        old, new = original_layers[name], new_layers[name]
        expected_rank = min(k, old.r["default"])
        assert new.r["default"] == result.ranks[name] == expected_rank
        assert new.scaling["default"] == pytest.approx(old.scaling["default"], rel=1e-12)
        assert relative_error(new_deltas[name], best_rank_k(delta, expected_rank)) < tolerance, name
    with safe_open(str(tmp_path / "squeezed" / "adapter_model.safetensors"), "pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    original = load_file(str(source / "adapter_model.safetensors"))
    assert set(stored) == set(original)  # every key survives (magnitudes, modules_to_save, base embeddings)
    assert {t.dtype for t in stored.values()} == {t.dtype for t in original.values()}
    for key, tensor in original.items():
        if "lora_A" not in key and "lora_B" not in key and "lora_embedding" not in key:
            assert torch.equal(stored[key], tensor), key

    # the live model gives the same folder as its saved copy (keys from get_peft_model_state_dict)
    compress_adapter(model, tmp_path / "from_live", target_rank=k)
    from_live = load_file(str(tmp_path / "from_live" / "adapter_model.safetensors"))
    assert from_live.keys() == stored.keys()
    for key, tensor in stored.items():
        torch.testing.assert_close(from_live[key], tensor, rtol=0, atol=0)
    live_config, disk_config = config_of(tmp_path / "from_live"), config_of(tmp_path / "squeezed")
    for key in (
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_dora",
        "use_rslora",
        "modules_to_save",
    ):
        assert live_config[key] == disk_config[key], key

    if variant == "patterns":
        config = config_of(tmp_path / "squeezed")
        q = "model.layers.0.self_attn.q_proj"
        assert new_layers[q].r["default"] == 2  # below the target: kept as it was
        assert torch.equal(
            new_layers[q].lora_A["default"].weight, original_layers[q].lora_A["default"].weight
        )
        down = "model.layers.1.mlp.down_proj"
        assert new_layers[down].lora_alpha["default"] == pytest.approx(32 * 4 / 6, rel=1e-12)
        assert all(key.startswith("^") for key in config["rank_pattern"])
    if variant == "rslora":
        assert config_of(tmp_path / "squeezed")["lora_alpha"] == pytest.approx(16 * math.sqrt(4 / 8))
    if variant == "dora":
        for name, old in original_layers.items():
            torch.testing.assert_close(
                new_layers[name].lora_magnitude_vector["default"].weight,
                old.lora_magnitude_vector["default"].weight,
                rtol=0,
                atol=0,
            )
    if variant == "embedding":
        embed = new_layers["model.embed_tokens"]
        assert embed.lora_embedding_A["default"].shape == (4, 128)
        assert embed.lora_embedding_B["default"].shape == (64, 4)


def test_pattern_keys_match_exactly_one_module():
    from peft.utils.other import get_pattern_key

    from lora_monitor.adapters import pattern_key

    names = [
        "model.layers.1.mlp.up_proj",
        "vision_tower.model.layers.1.mlp.up_proj",  # ends with the first name
        "model.layers.11.mlp.up_proj",
        "model.layers.1Xmlp.up_proj",  # an unescaped "." would match this
        "up_proj",
    ]
    keys = [pattern_key(name) for name in names]
    for name, key in zip(names, keys, strict=True):
        # every ordering: PEFT takes the first key that matches
        assert get_pattern_key(keys, name) == key
        assert get_pattern_key(keys[::-1], name) == key


def test_alpha_is_never_rounded(tmp_path):
    # r 64 -> 2 with alpha 16: alpha_new = 0.5, which int() would make 0 (scale 0: the adapter vanishes)
    model = decaying_llama(r=64, lora_alpha=16, target_modules=["q_proj"])
    result = compress_adapter(saved(model, tmp_path / "in"), tmp_path / "out", target_rank=2)
    assert result.config["lora_alpha"] == 0.5
    assert config_of(tmp_path / "out")["lora_alpha"] == 0.5
    reloaded = reload(tmp_path / "out")
    for layer in lora_layers(reloaded).values():
        assert layer.scaling["default"] == 16 / 64


def test_per_module_ranks_from_a_live_model(tmp_path):
    model = decay_spectrum(peft_llama(SEED), ratio=0.5)
    # give the modules different spectra so that the threshold picks different ranks
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(model).values()):
            layer.lora_A["default"].weight[:, :] *= (0.3 + 0.1 * i) ** torch.arange(8.0).unsqueeze(1)
    deltas = dense_deltas(model)
    result = compress_adapter(model, tmp_path / "out", per_module=True, min_variance_retention=0.97)
    expected = {
        name: next(k for k in range(1, 9) if energy_retained(delta, k) >= 0.97)
        for name, delta in deltas.items()
    }
    assert result.ranks == expected
    assert len(set(expected.values())) > 2
    config = config_of(tmp_path / "out")
    assert config["rank_pattern"]
    reloaded = reload(tmp_path / "out")
    layers, new_deltas = lora_layers(reloaded), dense_deltas(reloaded)
    for name, delta in deltas.items():
        assert layers[name].r["default"] == expected[name], name
        assert relative_error(new_deltas[name], best_rank_k(delta, expected[name])) < 1e-4
    # the same adapter from its folder gives the same tensors
    compress_adapter(
        saved(model, tmp_path / "in"), tmp_path / "out2", per_module=True, min_variance_retention=0.97
    )
    from_live = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    from_disk = load_file(str(tmp_path / "out2" / "adapter_model.safetensors"))
    assert from_live.keys() == from_disk.keys()
    for key in from_live:
        torch.testing.assert_close(from_live[key], from_disk[key])


def test_recommended_rank_is_the_default_target(tmp_path):
    model = decaying_llama()
    analysis = analyze_adapter(model, min_variance_retention=0.9)
    result = compress_adapter(model, tmp_path / "out", min_variance_retention=0.9)
    assert set(result.ranks.values()) == {analysis.recommended_rank}
    assert config_of(tmp_path / "out")["r"] == analysis.recommended_rank


def test_target_at_source_rank_reproduces_the_model_and_above_is_refused(tmp_path):
    model = decaying_llama(modules_to_save=["lm_head"])
    source = saved(model, tmp_path / "in")
    # Above the adapter's rank 8 is out of range (issue 29: it wrote an unchanged copy and said nothing).
    with pytest.raises(LoraMonitorError, match="target_rank 16 is above the adapter's rank 8"):
        compress_adapter(source, tmp_path / "out", target_rank=16)
    assert not (tmp_path / "out").exists()
    compress_adapter(source, tmp_path / "out", target_rank=8)
    assert (
        load_file(str(source / "adapter_model.safetensors")).keys()
        == load_file(str(tmp_path / "out" / "adapter_model.safetensors")).keys()
    )
    for key, tensor in load_file(str(source / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "out" / "adapter_model.safetensors"))[key])
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reload(tmp_path / "out")(ids).logits, model.eval()(ids).logits)


@pytest.mark.slow
def test_same_delta_as_peft_add_weighted_adapter_svd(tmp_path):
    model = decaying_llama()
    compress_adapter(model, tmp_path / "out", target_rank=3)
    ours = dense_deltas(reload(tmp_path / "out"))
    # PEFT falls back to "linear" for a single adapter, so the adapter is listed twice with weights summing
    # to one: the merged delta is the original one, then PEFT's dense SVD truncates it to rank 3.
    model.add_weighted_adapter(["default", "default"], [0.5, 0.5], "svd3", combination_type="svd", svd_rank=3)
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].r["svd3"] == 3
    peft_route = dense_deltas(model, "svd3")
    for name, delta in peft_route.items():
        assert relative_error(ours[name], delta) < 1e-4, name


def test_conv2d_lora_round_trip(tmp_path):
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["conv1", "conv2"], init_lora_weights=False)
    torch.manual_seed(1)
    model = decay_spectrum(get_peft_model(tiny_conv_net(), config))
    source = saved(model, tmp_path / "in")
    analysis = analyze_adapter(source)
    deltas = dense_deltas(model)
    for record in analysis.modules:
        dense = torch.linalg.svdvals(deltas[record.name])[: record.rank]
        torch.testing.assert_close(
            torch.tensor(record.singular_values, dtype=torch.float64), dense, rtol=1e-5, atol=1e-9
        )
    compress_adapter(source, tmp_path / "out", target_rank=3)
    reloaded = PeftModel.from_pretrained(tiny_conv_net(), tmp_path / "out")
    layers = lora_layers(reloaded)
    assert layers["conv1"].lora_A["default"].weight.shape == (3, 3, 3, 3)
    assert layers["conv1"].lora_B["default"].weight.shape == (16, 3, 1, 1)
    for name, delta in dense_deltas(reloaded).items():
        assert relative_error(delta, best_rank_k(deltas[name], 3)) < 1e-4


def test_bin_adapter_is_written_as_safetensors(tmp_path):
    model = decaying_llama(target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "in", safe_serialization=False)
    compress_adapter(tmp_path / "in", tmp_path / "out", target_rank=2)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_model.bin").exists()
    for name, delta in dense_deltas(reload(tmp_path / "out")).items():
        assert relative_error(delta, best_rank_k(dense_deltas(model)[name], 2)) < 1e-4


# ---- bad input: a clear error, nothing written, the input untouched -------------------------------------


@pytest.fixture()
def adapter_folder(tmp_path):
    return saved(decaying_llama(), tmp_path / "adapter")


def assert_nothing_written(parent: Path, output: Path) -> None:
    assert not output.exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_missing_folder(tmp_path):
    with pytest.raises(LoraMonitorError, match="no such adapter folder"):
        analyze_adapter(tmp_path / "nope")
    with pytest.raises(LoraMonitorError, match="no such adapter folder"):
        compress_adapter(tmp_path / "nope", tmp_path / "out", target_rank=2)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_safetensors(tmp_path, adapter_folder):
    weights = adapter_folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = folder_digest(adapter_folder)
    for call in (
        lambda: analyze_adapter(adapter_folder),
        lambda: compress_adapter(adapter_folder, tmp_path / "out", target_rank=2),
    ):
        with pytest.raises(LoraMonitorError, match=r"adapter_model\.safetensors"):
            call()
    assert folder_digest(adapter_folder) == before
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("rank", [0, -3, True, 2.5])
def test_bad_target_rank(tmp_path, adapter_folder, rank):
    with pytest.raises(LoraMonitorError, match="target_rank"):
        compress_adapter(adapter_folder, tmp_path / "out", target_rank=rank)
    with pytest.raises(LoraMonitorError, match="candidate_ranks"):
        analyze_adapter(adapter_folder, candidate_ranks=[4, rank])
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("threshold", [0, 1.5, -0.1, float("nan"), "0.9"])
def test_bad_threshold(tmp_path, adapter_folder, threshold):
    with pytest.raises(LoraMonitorError, match="min_variance_retention"):
        analyze_adapter(adapter_folder, min_variance_retention=threshold)
    with pytest.raises(LoraMonitorError, match="min_variance_retention"):
        compress_adapter(adapter_folder, tmp_path / "out", min_variance_retention=threshold)
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tmp_path, adapter_folder, bad_value):
    weights = adapter_folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 2] = bad_value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = folder_digest(adapter_folder)
    with pytest.raises(LoraMonitorError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN/Inf"):
        analyze_adapter(adapter_folder)
    for options in ({"target_rank": 2}, {"per_module": True}):
        with pytest.raises(LoraMonitorError, match=r"model\.layers\.1\.mlp\.up_proj"):
            compress_adapter(adapter_folder, tmp_path / "out", **options)
    assert folder_digest(adapter_folder) == before
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_output_must_not_be_or_contain_the_input(tmp_path, adapter_folder):
    before = folder_digest(adapter_folder)
    with pytest.raises(LoraMonitorError, match="input adapter folder"):
        compress_adapter(adapter_folder, adapter_folder, target_rank=2, overwrite=True)
    with pytest.raises(LoraMonitorError, match="input adapter folder"):
        compress_adapter(adapter_folder, adapter_folder / "sub", target_rank=2)
    with pytest.raises(LoraMonitorError, match="contains the input"):
        compress_adapter(adapter_folder, tmp_path, target_rank=2, overwrite=True)
    assert folder_digest(adapter_folder) == before
    assert not (adapter_folder / "sub").exists()


def test_existing_output_needs_overwrite(tmp_path, adapter_folder):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(LoraMonitorError, match="not empty"):
        compress_adapter(adapter_folder, output, target_rank=2)
    assert (output / "keep.txt").read_text() == "mine"
    compress_adapter(adapter_folder, output, target_rank=2, overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert config_of(output)["r"] == 2
    assert_nothing_written(tmp_path, tmp_path / "absent")


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    import lora_monitor.adapters.folder as folder

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "save_file", broken_save)
    with pytest.raises(LoraMonitorError, match=r"out: cannot write .*disk full"):
        write_adapter_folder(tmp_path / "out", {"r": 1}, {"x": torch.zeros(2)})
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_both_rank_and_per_module_is_refused(tmp_path, adapter_folder):
    with pytest.raises(LoraMonitorError, match="not both"):
        compress_adapter(adapter_folder, tmp_path / "out", target_rank=2, per_module=True)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_all_zero_adapter_needs_an_explicit_rank(tmp_path):
    model = peft_llama(SEED, init_lora_weights=True)
    with pytest.raises(LoraMonitorError, match="every LoRA delta is zero"):
        compress_adapter(model, tmp_path / "out")
    compress_adapter(model, tmp_path / "out", target_rank=2)
    assert config_of(tmp_path / "out")["r"] == 2
