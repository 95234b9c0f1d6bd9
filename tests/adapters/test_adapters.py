"""LoRA discovery in live PEFT models and saved folders, checked against PEFT's own delta weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import peft_llama, tiny_conv_net, tiny_llama

from lora_monitor import LoraMonitorError, find_lora_modules, load_adapter, lora_spectra


def peft_reference_spectrum(record) -> torch.Tensor:
    """Singular values of the delta PEFT itself computes for this module (an independent route).

    PEFT rounds its delta to the factors' dtype; for half-precision factors the reference is the dense
    float64 product of PEFT's own parameters instead.
    """
    module, adapter = record.module, record.adapter_name
    if record.kind == "linear" and module.lora_A[adapter].weight.dtype in (torch.float16, torch.bfloat16):
        B, A = module.lora_B[adapter].weight.double(), module.lora_A[adapter].weight.double()
        return torch.linalg.svdvals(module.scaling[adapter] * B @ A)[: record.rank]
    delta = module.get_delta_weight(adapter).detach().double()
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[: record.rank]


def check_live_model(model, adapter_name=None, rtol=1e-5):
    records = find_lora_modules(model, adapter_name)
    assert records
    spectra = lora_spectra([r.B for r in records], [r.A for r in records], [r.scale for r in records])
    for record, S in zip(records, spectra.delta, strict=True):
        assert record.scale == record.module.scaling[record.adapter_name]
        reference = peft_reference_spectrum(record).detach()
        S = S[: record.rank]
        assert torch.allclose(
            S.detach(), reference.detach(), rtol=rtol, atol=rtol * float(reference.max())
        ), record.name
    return records


def bert_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
    )
    return BertModel(config)


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(),
        dict(use_rslora=True, r=16, lora_alpha=8),
        dict(rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 3}),
        dict(use_dora=True, target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["embed_tokens", "q_proj"]),
    ],
    ids=["plain", "rslora", "patterns", "dora", "embedding"],
)
def test_live_llama_spectra_match_peft_deltas_and_saved_scales_match_live(tmp_path, lora_kwargs):
    model = peft_llama(**lora_kwargs)
    records = check_live_model(model)
    model.save_pretrained(tmp_path)
    saved = {m.name: m for m in load_adapter(tmp_path)}
    assert set(saved) == {r.name for r in records}
    for record in records:
        stored = saved[record.name]
        assert stored.scale == record.scale and stored.rank == record.rank and stored.kind == record.kind
        assert stored.use_dora == record.use_dora
        assert torch.equal(stored.A, record.A) and torch.equal(stored.B, record.B)
    kinds = {r.kind for r in records}
    if "embed_tokens" in str(lora_kwargs.get("target_modules")):
        assert "embedding" in kinds
    if "rank_pattern" in lora_kwargs:
        assert saved["model.layers.1.self_attn.q_proj"].rank == 4
        assert saved["model.layers.0.self_attn.q_proj"].rank == 8
        assert saved["model.layers.0.mlp.down_proj"].scale == 16 / 2
        assert saved["model.layers.0.self_attn.v_proj"].scale == 3 / 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors(dtype):
    model = peft_llama(target_modules=["q_proj", "down_proj"]).to(dtype)
    records = find_lora_modules(model)
    assert records[0].A.dtype == dtype
    check_live_model(model)


def test_bert_encoder_and_conv2d_lora():
    encoder = get_peft_model(
        bert_encoder(), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    )
    records = check_live_model(encoder)
    assert {r.module_type for r in records} == {"query", "value"} and all(r.is_attention for r in records)
    assert records[0].layer_index == 0 and records[-1].layer_index == 1

    convnet = get_peft_model(
        tiny_conv_net(), LoraConfig(r=4, target_modules=["conv1"], init_lora_weights=False)
    )
    (record,) = check_live_model(convnet)
    assert record.kind == "conv" and record.A.shape == (4, 27) and record.B.shape == (16, 4)
    assert record.base_weight().shape == (16, 27)


def test_two_adapters_choose_by_name_and_reference_adapter_is_skipped(tmp_path):
    model = peft_llama(target_modules=["q_proj"])
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    second = check_live_model(model, "second")
    assert {r.module_type for r in second} == {"v_proj"} and second[0].rank == 2
    assert {r.adapter_name for r in find_lora_modules(model)} == {"default"}

    # TRL's GRPOTrainer adds a frozen copy named "ref": it is never picked by default.
    model.add_adapter("ref", LoraConfig(r=8, target_modules=["q_proj"]))
    model.set_adapter("ref")
    assert {r.adapter_name for r in find_lora_modules(model)} == {"default"}

    model.save_pretrained(tmp_path)  # non-default adapters go to sub-folders
    assert {m.name for m in load_adapter(tmp_path, "second")} == {r.name for r in second}
    with pytest.raises(LoraMonitorError, match="third"):
        load_adapter(tmp_path, "third")
    with pytest.raises(LoraMonitorError, match=r"'third'.*adapters are"):
        find_lora_modules(model, "third")


def test_live_records_follow_parameter_swaps_and_expose_base_weight():
    model = peft_llama(target_modules=["q_proj"])
    record = find_lora_modules(model)[0]
    assert torch.equal(record.base_weight(), record.module.get_base_layer().weight)
    layer = record.module.lora_A["default"]
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight))
    assert torch.count_nonzero(record.A) == 0


def test_bin_weights_are_read_too(tmp_path):
    model = peft_llama(target_modules=["q_proj"])
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    records = load_adapter(tmp_path).modules
    live = find_lora_modules(model)
    assert all(torch.equal(a.B, b.B) for a, b in zip(records, live, strict=True))


def test_saved_folder_reloads_with_peft(tmp_path):
    model = peft_llama(target_modules=["q_proj"])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert [r.name for r in find_lora_modules(reloaded)] == [m.name for m in load_adapter(tmp_path)]


# ---- bad input ------------------------------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    with pytest.raises(LoraMonitorError, match=r"no adapter_config\.json") as error:
        load_adapter(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(LoraMonitorError, match="no such adapter folder"):
        load_adapter(tmp_path / "missing")


def test_truncated_and_mismatched_files(tmp_path):
    model = peft_llama(target_modules=["q_proj"])
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraMonitorError, match=r"adapter_model\.safetensors"):
        load_adapter(tmp_path)

    weights.write_bytes(data)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraMonitorError, match="rank 8 in its weights but 4"):
        load_adapter(tmp_path)

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraMonitorError, match="not valid JSON"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    ("A_shape", "B_shape"),
    [((8, 32), ()), ((8,), (32, 8)), ((8, 32), (32, 8, 2)), ((8, 32, 1), (32, 8)), ((8, 0), (32, 8))],
)
def test_factors_that_are_no_lora_pair_are_refused_naming_the_module(tmp_path, A_shape, B_shape):
    # A 0-d B was an IndexError; a 1-D A was read as a rank-8 module and compressed into a 1-D A.
    from safetensors.torch import load_file, save_file

    peft_llama(target_modules=["q_proj"]).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[f"{prefix}.lora_A.weight"] = torch.ones(A_shape)
    tensors[f"{prefix}.lora_B.weight"] = torch.ones(B_shape)
    save_file(tensors, weights)
    with pytest.raises(LoraMonitorError) as refused:
        load_adapter(tmp_path)
    assert str(refused.value) == (
        f"{weights}: {prefix} has A of shape {list(A_shape)} and B of shape {list(B_shape)}: not a LoRA pair "
        "(A is r × n and B is m × r, both non-empty; a conv's with kernel dimensions)"
    )


def test_the_base_finiteness_check_skips_offloaded_weights_and_reads_float8():
    from lora_monitor.adapters.base_model import check_finite_weights

    model = torch.nn.Linear(4, 4)
    model.offloaded = torch.nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)
    model.steps = torch.nn.Parameter(torch.arange(3), requires_grad=False)  # not floating: not read
    model.fp8 = torch.nn.Parameter(torch.ones(4).to(torch.float8_e4m3fn), requires_grad=False)
    check_finite_weights(model, "base")  # before: meta tensors and float8 raised torch's own errors
    for name, bad in [("fp8", float("nan")), ("weight", float("-inf")), ("weight", float("nan"))]:
        with torch.no_grad():
            getattr(model, name)[0] = torch.tensor(bad).to(getattr(model, name).dtype)
        with pytest.raises(LoraMonitorError, match=f"^base: the base model's {name} holds NaN or Inf values"):
            check_finite_weights(model, "base")
        with torch.no_grad():
            getattr(model, name)[0] = torch.tensor(1.0).to(getattr(model, name).dtype)


def test_model_without_lora():
    with pytest.raises(LoraMonitorError, match="no LoRA modules"):
        find_lora_modules(tiny_llama())


def test_pattern_keys_match_as_peft_matches_them():
    from peft.utils.other import get_pattern_key

    from lora_monitor.adapters.naming import pattern_key, pattern_key_for

    names = [f"model.layers.{i}.self_attn.{kind}" for i in (0, 1, 11) for kind in ("q_proj", "v_proj")]
    names += ["model.embed_tokens", "lm_head", "model.layers.1.mlp.down_proj"]
    patterns = [
        ["q_proj"],
        ["layers.1.self_attn.q_proj", "q_proj"],
        [pattern_key("model.layers.1.self_attn.q_proj"), "v_proj"],
        ["down_proj", "^model\\.embed_tokens", "lm_head"],
        [],
    ]
    for keys in patterns:
        for name in names:
            assert pattern_key_for(keys, name) == get_pattern_key(keys, name), (keys, name)


@pytest.mark.slow
def test_reading_and_compressing_a_saved_adapter_imports_neither_peft_nor_transformers(tmp_path):
    import subprocess
    import sys

    peft_llama(0, r=4).save_pretrained(tmp_path / "adapter")
    script = (
        "import sys\n"
        "from lora_monitor import analyze_adapter, compress_adapter\n"
        f"analysis = analyze_adapter({str(tmp_path / 'adapter')!r}, progress=False)\n"
        f"compress_adapter({str(tmp_path / 'adapter')!r}, {str(tmp_path / 'out')!r}, target_rank=2)\n"
        "print(sorted(name for name in ('peft', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_moved_names_still_work_for_a_release_with_a_deprecation_warning():
    # Module naming left adapters/scaling.py for adapters/naming.py; the loss probe and the re-warm-up left
    # in_squeeze/schedule.py for modules named for them. The old places answer, with a warning, for a release.
    from lora_monitor.adapters import naming, scaling
    from lora_monitor.edit import EditConfig
    from lora_monitor.in_squeeze import loss_probe, rewarmup, schedule

    moved = [(scaling, name, naming) for name in ("module_block", "describe_module", "pattern_key")]
    moved += [(schedule, "LossProbe", loss_probe), (schedule, "LearningRateRewarmup", rewarmup)]
    for old_home, name, new_home in moved:
        with pytest.warns(DeprecationWarning, match=f"moved to {new_home.__name__}.{name}"):
            assert getattr(old_home, name) is getattr(new_home, name)
    with pytest.raises(AttributeError):
        scaling.no_such_name  # noqa: B018
    with pytest.warns(DeprecationWarning, match="checked when it is made"):
        EditConfig().validate()
