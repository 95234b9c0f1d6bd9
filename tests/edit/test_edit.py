"""Spectral editing: sensitivities against finite differences, identities, energy, written folders."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import SENTENCES, peft_llama, tiny_llama

from lora_monitor import LoraMonitorError, find_lora_modules, load_adapter
from lora_monitor._io import EDIT_META_NAME
from lora_monitor.edit import calibration_batches, spectral_edit
from lora_monitor.edit.edit import module_svds, sigma_sensitivities

TARGETS = ["o_proj", "down_proj"]


def lora_model(dtype=torch.float32, seed=0):
    return peft_llama(seed=seed, target_modules=TARGETS).to(dtype)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def float64_loss(model, batches):
    """The causal-LM loss recomputed in float64 (transformers' own loss upcasts logits to float32 only)."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
            total += torch.nn.functional.cross_entropy(shifted, batch["labels"][:, 1:].reshape(-1)).item()
    return total / len(batches)


@pytest.mark.slow
def test_sensitivities_equal_finite_differences(tokenizer):
    model = lora_model(torch.float64)
    batches = calibration_batches(SENTENCES[:4], tokenizer, batch_size=2)
    modules = [m for m in find_lora_modules(model) if m.module_type in TARGETS]
    decomposed = module_svds(model, modules)
    gradients = sigma_sensitivities(model, decomposed, batches)

    # Large enough to rise above the float32 parts of the forward (rotary tables), small enough for O(h²).
    step = 1e-2
    for item, gradient in list(zip(decomposed, gradients, strict=True))[:2]:
        adapter = item.module.adapter_name
        A_param, B_param = (
            item.module.module.lora_A[adapter].weight,
            item.module.module.lora_B[adapter].weight,
        )
        original_A, original_B = A_param.detach().clone(), B_param.detach().clone()
        for k in (0, 3, 7):
            losses = []
            for sign in (1, -1):
                sigma = item.sigma.double().clone()
                sigma[k] += sign * step
                with torch.no_grad():
                    B_param.copy_(item.U.double() * sigma / item.module.scale)
                    A_param.copy_(item.V.double().T)
                losses.append(float64_loss(model, batches))
            finite_difference = (losses[0] - losses[1]) / (2 * step)
            # abs: the finite difference's own noise on the weakest σ (gradient ~1e-4): two decompositions
            # that agree to 1e-7 give the same gradient to 6 digits and finite differences 6e-8 apart.
            assert gradient[k].item() == pytest.approx(finite_difference, rel=1e-3, abs=3e-7), (
                item.module.name,
                k,
            )
        with torch.no_grad():
            A_param.copy_(original_A)
            B_param.copy_(original_B)


def test_unit_factors_reproduce_the_model(tokenizer):
    model = lora_model()
    batch = calibration_batches(SENTENCES[:2], tokenizer, batch_size=2)[0]
    before = logits(model, batch)
    result = spectral_edit(
        model,
        SENTENCES[:4],
        tokenizer=tokenizer,
        amp_factor=1.0,
        sup_factor=1.0,
        mid_factor=1.0,
        preserve_energy=None,
    )
    assert torch.allclose(logits(result.model, batch), before, atol=1e-5)
    edit = result.modules[0]
    assert edit.k_core == round(0.2 * 8) and edit.k_noise == round(0.2 * 8)
    assert torch.allclose(torch.tensor(edit.sigma_after), torch.tensor(edit.sigma_before), rtol=1e-12)


def test_fp32_factors_are_decomposed_as_exactly_as_fp32_holds():
    # The edited factors are written from U and V. B's directions span 1e-4, below what a float32 Gram
    # matrix resolves (√eps = 3.4e-4): a float32 decomposition loses them; the engine's float64 does not.
    model = lora_model()
    for record in find_lora_modules(model):
        with torch.no_grad():
            record.module.lora_B["default"].weight.mul_(torch.logspace(0, -4, 8))
    modules = find_lora_modules(model)
    for module, item in zip(modules, module_svds(model, modules), strict=True):
        delta = module.scale * module.B.double() @ module.A.double()
        rebuilt = (item.U.double() * item.sigma.double()) @ item.V.double().mT
        assert torch.linalg.norm(rebuilt - delta) <= 1e-6 * torch.linalg.norm(delta), module.name


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_energy_is_preserved(tokenizer, norm):
    result = spectral_edit(lora_model(), SENTENCES[:4], tokenizer=tokenizer, preserve_energy=norm)
    power = 1 if norm == "l1" else 2
    for edit in result.modules:
        before = sum(s**power for s in edit.sigma_before)
        after = sum(s**power for s in edit.sigma_after)
        assert after == pytest.approx(before, rel=1e-6)
        assert edit.sigma_after != edit.sigma_before
    # The live factors hold the edited spectrum.
    live = {m.name: m for m in find_lora_modules(result.model)}
    edit = result.modules[0]
    module = live[edit.name]
    dense = torch.linalg.svdvals(module.scale * module.B.double() @ module.A.double())[: module.rank]
    assert torch.allclose(
        dense, torch.tensor(edit.sigma_after, dtype=torch.float64).sort(descending=True).values, rtol=1e-4
    )


def test_abs_select_amplifies_most_sensitive_and_random_index_is_seeded(tokenizer):
    selected = spectral_edit(lora_model(), SENTENCES[:4], tokenizer=tokenizer, preserve_energy=None)
    for edit in selected.modules:
        magnitude = [abs(g) for g in edit.sensitivity]
        assert min(magnitude[i] for i in edit.core_indices) >= max(
            magnitude[i] for i in range(edit.rank) if i not in edit.core_indices
        )
        for i in edit.core_indices:
            assert edit.sigma_after[i] == pytest.approx(1.25 * edit.sigma_before[i])
        for i in edit.noise_indices:
            assert edit.sigma_after[i] == pytest.approx(0.8 * edit.sigma_before[i])

    def picks(seed):
        result = spectral_edit(
            lora_model(), SENTENCES[:4], tokenizer=tokenizer, mode="random_index", seed=seed
        )
        return [(e.core_indices, e.noise_indices) for e in result.modules]

    first, again, other = picks(1), picks(1), picks(2)
    assert first == again and first != other
    assert all(len(core) == 2 and len(noise) == 2 for core, noise in first)


def test_gd_mode_moves_sigma_against_the_gradient(tokenizer):
    result = spectral_edit(lora_model(), SENTENCES[:4], tokenizer=tokenizer, mode="gd", preserve_energy=None)
    for edit in result.modules:
        for before, after, gradient in zip(
            edit.sigma_before, edit.sigma_after, edit.sensitivity, strict=True
        ):
            if gradient > 0:
                assert after < before
            elif gradient < 0:
                assert after > before


def test_written_folder_loads_with_peft_and_holds_the_metadata(tmp_path, tokenizer):
    source = lora_model(torch.bfloat16)
    source.save_pretrained(tmp_path / "adapter")
    base_folder = tmp_path / "base"
    tiny_llama().save_pretrained(base_folder)
    result = spectral_edit(
        tmp_path / "adapter",
        SENTENCES[:4],
        tokenizer=tokenizer,
        base_model=base_folder,
        output_path=tmp_path / "edited",
        heldout_data=SENTENCES[4:8],
    )
    meta = json.loads((tmp_path / "edited" / EDIT_META_NAME).read_text())
    assert meta["config"]["mode"] == "abs_select" and len(meta["modules"]) == 4
    assert set(result.losses) == {
        "calibration_before",
        "calibration_after",
        "heldout_before",
        "heldout_after",
    }
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "edited")
    batch = calibration_batches(SENTENCES[:2], tokenizer)[0]
    assert all(m.A.dtype == torch.bfloat16 for m in load_adapter(tmp_path / "edited"))  # stored dtype kept
    with torch.no_grad():  # the live edit, rounded to the stored bf16, is what was written
        for name, param in result.model.named_parameters():
            if "lora_" in name:
                param.copy_(param.to(torch.bfloat16))
    assert torch.allclose(logits(reloaded, batch), logits(result.model, batch), atol=1e-5)


def test_a_module_masked_by_in_squeeze_is_refused(tokenizer):
    from lora_monitor.in_squeeze.resize import squeeze_model

    model = lora_model()
    squeeze_model(model, {"model.layers.1.mlp.down_proj": 4}, mode="mask")  # r=8 parameters, 4 kept
    with pytest.raises(LoraMonitorError, match=r"model\.layers\.1\.mlp\.down_proj .*masked by In-Squeeze"):
        spectral_edit(model, SENTENCES[:2], tokenizer=tokenizer)


@pytest.mark.parametrize("broken", ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"])
def test_an_adapter_with_a_nan_factor_is_refused_whether_or_not_it_is_edited(tmp_path, tokenizer, broken):
    # o_proj is left out of the edit below: its NaN reached the written copy, and fused attention hid it from
    # the losses; a NaN in an edited module ended in the eigensolver's traceback.
    model = lora_model()
    with torch.no_grad():
        find_lora_modules(model)[[m.name for m in find_lora_modules(model)].index(broken)].B[0, 1] = float(
            "nan"
        )
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    with pytest.raises(LoraMonitorError) as refused:
        spectral_edit(model, SENTENCES[:2], tokenizer=tokenizer, target_modules=["down_proj"])
    assert str(refused.value) == (
        f"the model: module {broken} has NaN/Inf values in its LoRA factors; the adapter is broken (diverged "
        "training?), nothing was edited"
    )
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, before[name], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "chosen"),
    [
        ({"amp_factor": 1e308, "preserve_energy": None}, "amp_factor=1e+308"),
        ({"mode": "gd", "eta": 100.0, "preserve_energy": None}, "eta=100"),
        ({"mid_factor": 1e308, "preserve_energy": None}, "amp_factor=1.25, mid_factor=1e+308"),
    ],
)
def test_an_edit_beyond_what_the_dtype_holds_changes_and_writes_nothing(tmp_path, tokenizer, options, chosen):
    model = lora_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    with pytest.raises(LoraMonitorError) as refused:
        spectral_edit(model, SENTENCES[:2], tokenizer=tokenizer, output_path=tmp_path / "out", **options)
    message = str(refused.value)
    assert message.startswith("the edit gives module ") and f"NaN/Inf factors: {chosen} with" in message
    assert message.endswith("beyond what torch.float32 holds; nothing was edited")
    assert not (tmp_path / "out").exists()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, before[name], rtol=0, atol=0)


def test_bad_options_and_inputs(tmp_path, tokenizer):
    with pytest.raises(LoraMonitorError, match="mode must be"):
        spectral_edit(lora_model(), SENTENCES[:2], tokenizer=tokenizer, mode="best")
    bad_numbers = {
        "core_frac": (1.5, "core_frac must be at least 0 and at most 1, got 1.5"),
        "amp_factor": (-1.0, "amp_factor must be at least 0, got -1.0"),
        "eta": (float("nan"), "eta must be a finite number, got nan"),
        "seed": (0.5, "seed must be a whole number, got 0.5"),
        "noise_frac": (0.9, "core_frac \\+ noise_frac must be at most 1"),
    }
    for option, (value, message) in bad_numbers.items():
        with pytest.raises(LoraMonitorError, match=message):
            spectral_edit(lora_model(), SENTENCES[:2], tokenizer=tokenizer, **{option: value})
    bad_batching = {
        "batch_size": (0, "batch_size must be at least 1, got 0"),
        "max_length": (2.5, "max_length must be a whole number, got 2.5"),
        "max_samples": (-1, "max_samples must be at least 0, got -1"),
    }
    for option, (value, message) in bad_batching.items():
        with pytest.raises(LoraMonitorError, match=message):
            spectral_edit(lora_model(), SENTENCES[:2], tokenizer=tokenizer, **{option: value})
        with pytest.raises(LoraMonitorError, match=message):
            calibration_batches(SENTENCES[:2], tokenizer, **{option: value})
    with pytest.raises(LoraMonitorError, match="no LoRA module matches"):
        spectral_edit(lora_model(), SENTENCES[:2], tokenizer=tokenizer, target_modules=["q_proj"])
    with pytest.raises(LoraMonitorError, match="need a tokenizer"):
        spectral_edit(lora_model(), SENTENCES[:2])
    lora_model().save_pretrained(tmp_path / "adapter")
    with pytest.raises(LoraMonitorError, match="base model"):
        spectral_edit(tmp_path / "adapter", SENTENCES[:2], tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"update": "fast"}, "update must be one of ('multiplicative', 'additive'), got 'fast'"),
        ({"preserve_energy": "l3"}, "preserve_energy must be one of ('l1', 'l2', None), got 'l3'"),
        ({"mode": "best"}, "mode must be one of ('abs_select', 'random_index', 'gd'), got 'best'"),
        ({"layers": [0, 1.5]}, "every layer of layers must be a whole number, got 1.5"),
        ({"target_modules": ["o_proj", 3]}, "every target_modules entry must be a module name, got 3"),
    ],
)
def test_choices_are_checked_by_the_one_choice_checker(options, message):
    # errors.check_choice's words, as for every other choice option of the API and the command
    from lora_monitor.edit import edit_config

    with pytest.raises(LoraMonitorError) as refused:
        edit_config(**options)
    assert str(refused.value) == message


def test_an_edit_config_is_checked_when_it_is_made_and_stays_as_made():
    # One options convention: a dataclass checked in __post_init__, frozen so it cannot go out of range later.
    from dataclasses import FrozenInstanceError

    from lora_monitor.edit import EditConfig

    with pytest.raises(LoraMonitorError, match="core_frac must be at least 0 and at most 1, got 2"):
        EditConfig(core_frac=2)
    config = EditConfig(target_modules="o_proj", layers=[1])
    assert (config.target_modules, config.layers) == (("o_proj",), (1,))
    with pytest.raises(FrozenInstanceError):
        config.core_frac = 2


@pytest.mark.slow
def test_command_line_edit_with_eval(tmp_path, tokenizer, capsys):
    from lora_monitor.cli import main

    lora_model().save_pretrained(tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "calibration.txt"
    data.write_text("\n".join(SENTENCES[:10]))
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    arguments = ["edit", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--data", str(data)]
    status = main([*arguments, "--out", str(tmp_path / "edited"), "--eval", "--json"])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert {"heldout_before", "heldout_after"} <= set(report["losses"])
    assert (tmp_path / "edited" / EDIT_META_NAME).is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before  # input untouched

    status = main([*arguments[:-1], str(tmp_path / "missing.txt"), "--out", str(tmp_path / "again")])
    assert status == 2
    assert "missing.txt: no such data file" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


# ---- issue 29, class 2: no edit and no loss from data that scores no token ---------------------------------


def test_calibration_or_heldout_data_that_scores_no_token_is_refused(tmp_path, tokenizer):
    # One-token texts in a causal LM have nothing to predict: the loss is a mean over no label (NaN), and
    # before issue 29 its NaN gradient became the edited σ (mode "gd") and the losses --eval reported.
    one_token = ["adapter", "rank", "the", "frozen"]
    with pytest.raises(LoraMonitorError, match="calibration data: no token is scored in 2 batch"):
        spectral_edit(lora_model(), one_token, tokenizer=tokenizer, mode="gd", output_path=tmp_path / "a")
    with pytest.raises(LoraMonitorError, match="held-out data: no token is scored"):
        spectral_edit(
            lora_model(),
            SENTENCES[:4],
            tokenizer=tokenizer,
            heldout_data=one_token,
            output_path=tmp_path / "b",
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_one_token_calibration_texts_are_left_out_of_the_sensitivities(tokenizer):
    model = lora_model(torch.float64)
    modules = [m for m in find_lora_modules(model) if m.module_type in TARGETS]
    decomposed = module_svds(model, modules)
    clean = calibration_batches(SENTENCES[:4], tokenizer, batch_size=2)
    mixed = [*calibration_batches(["adapter"], tokenizer, batch_size=1), *clean]
    expected = sigma_sensitivities(model, decomposed, clean)
    got = sigma_sensitivities(model, decomposed, mixed)
    assert all(torch.isfinite(g).all() for g in got)
    assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-14) for g, e in zip(got, expected, strict=True))


def test_command_line_eval_on_one_token_texts_writes_nothing(tmp_path, tokenizer, capsys):
    from lora_monitor.cli import main

    lora_model().save_pretrained(tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data, heldout = tmp_path / "calibration.txt", tmp_path / "heldout.txt"
    data.write_text("\n".join(SENTENCES[:4]))
    heldout.write_text("adapter\nrank\n")
    capsys.readouterr()
    arguments = ["edit", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--data", str(data)]
    status = main([*arguments, "--out", str(tmp_path / "edited"), "--eval", "--heldout", str(heldout)])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and "Traceback" not in captured.err
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("lora-monitor edit: error: held-out data: no token is scored in 1 batch(es)")
    )
    assert not (tmp_path / "edited").exists()


# ---- issue 29, class 3: data files in the documented shapes only -------------------------------------------


def test_data_files_in_the_documented_shapes_are_read(tmp_path):
    from lora_monitor.edit import read_texts

    texts = SENTENCES[:3]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "a.jsonl").write_text(
        f'{json.dumps(texts[0])}\n\n{{"text": {json.dumps(texts[1])}, "id": 2}}\n'
    )
    (tmp_path / "a.json").write_text(json.dumps([texts[0], {"text": texts[1]}, texts[2]]))
    (tmp_path / "b.JSON").write_text(json.dumps(texts))
    assert read_texts(tmp_path / "a.txt") == texts
    assert read_texts(tmp_path / "a.jsonl") == texts[:2]
    assert read_texts(tmp_path / "a.json") == texts
    assert read_texts(tmp_path / "b.JSON") == texts


@pytest.mark.parametrize(
    ("name", "content", "found"),
    [
        ("object.json", {"text": SENTENCES[:3]}, "holds an object with keys ['text'], not a list of texts"),
        ("string.json", "one text", "holds a string, not a list of texts"),
        ("number.json", 3, "holds a number, not a list of texts"),
        ("null.json", None, "holds null, not a list of texts"),
        ("nested.json", [SENTENCES[0], [SENTENCES[1]]], "entry 1 is a list, not a text"),
        ("no_text.json", [{"prompt": "a"}], "entry 0 is an object with keys ['prompt'], not a text"),
        ("text_list.json", [{"text": ["a", "b"]}], 'entry 0 is an object whose "text" is a list, not a text'),
        ("empty.json", [], "holds no texts"),
    ],
)
def test_a_json_file_in_another_shape_is_refused_naming_the_file_and_the_shape(
    tmp_path, name, content, found
):
    # Issue 29: {"text": [...]} was read as its keys (one text, "text") and a JSON string as its characters.
    from lora_monitor.edit import read_texts

    path = tmp_path / name
    path.write_text(json.dumps(content))
    with pytest.raises(LoraMonitorError) as refused:
        read_texts(path)
    assert str(refused.value).startswith(f"{path}: {found}")
    assert 'a .json file (a list of strings or of {"text": ...} objects)' in str(refused.value)


def test_a_jsonl_line_in_another_shape_is_refused_naming_the_line(tmp_path):
    from lora_monitor.edit import read_texts

    path = tmp_path / "data.jsonl"
    path.write_text('"a text"\n\n{"text": ["a", "b"]}\n')
    with pytest.raises(
        LoraMonitorError, match=r'data\.jsonl: line 3 is an object whose "text" is a list, not a text'
    ):
        read_texts(path)
    path.write_text('"a text"\n{"text": \n')
    with pytest.raises(LoraMonitorError, match=r"data\.jsonl: line 2 is not JSON"):
        read_texts(path)
