"""Bad input to Post-Squeeze (issue 12): a broken adapter config, an output that cannot be written, a
staging folder left by a killed run, no candidate rank reaching the threshold, PEFT's named-adapter layout.

Each case goes through the API (load_adapter / analyze_adapter / compress_adapter), the command (exit
status 2, one line, no traceback) and, where the callback meets it, PostSqueezeCallback with a real Trainer.
"""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch
from dense_reference import lora_layers
from peft import LoraConfig, PeftModel, get_peft_model
from squeeze_command import run
from tiny_models import peft_llama, tiny_llama, training_args
from transformers import Trainer

import lora_monitor.adapters.folder as folder_module
from lora_monitor.adapters import load_adapter
from lora_monitor.callbacks.post_squeeze import PostSqueezeCallback
from lora_monitor.errors import LoraMonitorError
from lora_monitor.post_squeeze import analyze_adapter, compress_adapter


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_one_line_error(status, out, err, *fragments):
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- item 3: a bad config in a saved adapter ------------------------------------------------------------

BAD_CONFIGS = {
    "r as a string": ({"r": "8"}, "r must be a whole number"),
    "r = 0": ({"r": 0}, "r must be at least 1"),
    "r = 2.5": ({"r": 2.5}, "r must be a whole number"),
    "lora_alpha null": ({"lora_alpha": None}, "lora_alpha must be a number"),
    "lora_alpha as a string": ({"lora_alpha": "16"}, "lora_alpha must be a number"),
    "rank_pattern a list": ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a mapping"),
    "alpha_pattern a string": ({"alpha_pattern": "q_proj=4"}, "alpha_pattern must be a mapping"),
    "rank_pattern value a string": ({"rank_pattern": {"q_proj": "8"}}, "rank_pattern['q_proj']"),
    "alpha_pattern value null": ({"alpha_pattern": {"v_proj": None}}, "alpha_pattern['v_proj']"),
    "target_modules missing": ({"target_modules": None}, "target_modules is missing"),
    "target_modules a number": ({"target_modules": 3}, "target_modules must be a list"),
    "target_modules too narrow": ({"target_modules": ["q_proj", "v_proj"]}, "does not cover 10 stored"),
}


def broken_copy(adapter_folder, tmp_path, change):
    folder = tmp_path / "broken"
    folder.mkdir()
    for path in adapter_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in change.items():
        if value is None and key == "target_modules":
            del config[key]  # missing altogether, as in a hand-written config
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_error_naming_file_and_key(tmp_path, capsys, adapter_folder, case):
    change, message = BAD_CONFIGS[case]
    folder = broken_copy(adapter_folder, tmp_path, change)
    config_file = str(folder / "adapter_config.json")
    for call in (
        lambda: load_adapter(folder),
        lambda: analyze_adapter(folder),
        lambda: compress_adapter(folder, tmp_path / "out", target_rank=2),
    ):
        with pytest.raises(LoraMonitorError) as caught:
            call()
        assert config_file in str(caught.value) and message in str(caught.value)
    status, out, err = run(capsys, folder, "--out", tmp_path / "out")
    assert_one_line_error(status, out, err, config_file, message)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_target_modules_would_load_only_some_modules(tmp_path, adapter_folder):
    """Why it is refused: PEFT fills in its Llama defaults and drops every other stored pair."""
    folder = broken_copy(adapter_folder, tmp_path, {"target_modules": None})
    reloaded = PeftModel.from_pretrained(tiny_llama(0), folder)
    assert len(lora_layers(reloaded)) < len(
        lora_layers(PeftModel.from_pretrained(tiny_llama(0), adapter_folder))
    )


# ---- item 5: an output that cannot be written -------------------------------------------------------------


def test_output_under_a_regular_file(tmp_path, capsys, adapter_folder):
    # Tests run as root, for whom a read-only folder is writable; a path under a regular file is not.
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    output = blocker / "out"
    with pytest.raises(LoraMonitorError, match="cannot write here") as caught:
        compress_adapter(adapter_folder, output, target_rank=2)
    assert str(output) in str(caught.value)
    status, out, err = run(capsys, adapter_folder, "--rank", "2", "--out", output)
    assert_one_line_error(status, out, err, str(output), "cannot write")
    assert blocker.read_text() == "not a folder" and leftovers(tmp_path) == []


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_a_device_this_machine_has_not_is_one_error(tmp_path, capsys, adapter_folder, device):
    # "foo" is no torch device; no machine has a 100th GPU (and a CPU-only build has none)
    for call in (
        lambda: analyze_adapter(adapter_folder, device=device),
        lambda: compress_adapter(adapter_folder, tmp_path / "out", target_rank=2, device=device),
    ):
        with pytest.raises(LoraMonitorError, match=f"device '{device}' is not available here"):
            call()
    status, out, err = run(
        capsys, adapter_folder, "--rank", "2", "--out", tmp_path / "out", "--device", device
    )
    assert_one_line_error(status, out, err, f"device '{device}' is not available here")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # the same check where the allocation's weight spectra are computed
    from lora_monitor.allocation import spectral_analysis

    with pytest.raises(LoraMonitorError, match=f"device '{device}' is not available here"):
        spectral_analysis(tiny_llama(0), device=device, progress=False)


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_nothing_behind(tmp_path, capsys, adapter_folder, monkeypatch):
    monkeypatch.setattr(folder_module, "save_file", full_disk)
    output = tmp_path / "out"
    with pytest.raises(LoraMonitorError, match="No space left on device") as caught:
        compress_adapter(adapter_folder, output, target_rank=2)
    assert str(output) in str(caught.value)
    assert not output.exists() and leftovers(tmp_path) == []
    status, out, err = run(capsys, adapter_folder, "--rank", "2", "--out", output)
    assert_one_line_error(status, out, err, str(output), "No space left on device")
    assert not output.exists() and leftovers(tmp_path) == []


def train(tmp_path, lm_dataset, callback, steps=4):
    model = peft_llama(0, init_lora_weights=True, r=8)
    args = training_args(tmp_path / "run", max_steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[callback])
    trainer.train()
    return model, trainer


@pytest.mark.slow
def test_callback_logs_a_full_disk_and_training_ends(tmp_path, lm_dataset, monkeypatch, caplog):
    monkeypatch.setattr(folder_module, "save_file", full_disk)
    callback = PostSqueezeCallback(min_variance_retention=0.9, compress=True, print_table=False)
    with caplog.at_level(logging.WARNING):
        _, trainer = train(tmp_path, lm_dataset, callback)
    assert trainer.state.global_step == 4
    assert callback.compression is None and "No space left on device" in callback.error
    assert str(tmp_path / "run" / "squeezed") in callback.error
    assert "No space left on device" in caplog.text
    # the analysis is still recorded; the failed copy left nothing behind
    manifest = json.loads((tmp_path / "run" / "squeeze_manifest.json").read_text())
    assert (
        manifest["recommended_rank"] == callback.analysis.recommended_rank and manifest["compressed"] is None
    )
    assert not (tmp_path / "run" / "squeezed").exists() and leftovers(tmp_path / "run") == []


@pytest.mark.slow
def test_callback_logs_an_unwritable_manifest(tmp_path, lm_dataset, caplog):
    # A folder where the manifest file should go: no rename can replace it, even as root.
    (tmp_path / "run" / "squeeze_manifest.json").mkdir(parents=True)
    callback = PostSqueezeCallback(min_variance_retention=0.9, print_table=False)
    with caplog.at_level(logging.WARNING):
        _, trainer = train(tmp_path, lm_dataset, callback)
    assert trainer.state.global_step == 4 and callback.analysis is not None
    assert "squeeze_manifest.json" in callback.error and "cannot write" in callback.error
    assert "cannot write" in caplog.text
    assert leftovers(tmp_path / "run") == []


# ---- item 6: a staging folder left by a killed run --------------------------------------------------------


def killed_run_leftover(parent):
    stale = parent / ".out.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half a file")
    return stale


def test_stale_staging_is_removed_by_the_next_write(tmp_path, capsys, adapter_folder):
    stale = killed_run_leftover(tmp_path)
    compress_adapter(adapter_folder, tmp_path / "out", target_rank=2)
    assert not stale.exists() and leftovers(tmp_path) == []
    assert {
        layer.r["default"]
        for layer in lora_layers(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")).values()
    } == {2}

    stale = killed_run_leftover(tmp_path / "cli")
    status, _, err = run(capsys, adapter_folder, "--rank", "2", "--out", tmp_path / "cli" / "out")
    assert status == 0, err
    assert not stale.exists() and leftovers(tmp_path / "cli") == []
    assert (tmp_path / "cli" / "out" / "adapter_model.safetensors").is_file()


# ---- item 7: no candidate rank reaches the threshold ------------------------------------------------------


def test_no_rank_reaches_the_threshold_is_said_as_such(tmp_path, capsys, adapter_folder):
    analysis = analyze_adapter(adapter_folder, candidate_ranks=[1, 2], min_variance_retention=0.99)
    kept = analysis.mean_variance[2]
    assert analysis.recommended_rank is None and kept < 0.99 and analysis.num_modules == 14
    expected = f"no rank in [1, 2] keeps 99% on average; rank 2 keeps {100 * kept:.1f}%"
    assert analysis.why_no_recommendation() == expected

    status, out, err = run(capsys, adapter_folder, "--ranks", "1,2", "--threshold", "0.99")
    assert status == 0, err
    assert expected in out and "zero" not in out

    status, out, err = run(
        capsys, adapter_folder, "--ranks", "1,2", "--threshold", "0.99", "--out", tmp_path / "o"
    )
    assert_one_line_error(status, out, err, expected, "nothing was written")

    with pytest.raises(LoraMonitorError) as caught:
        compress_adapter(adapter_folder, tmp_path / "o", candidate_ranks=[1, 2], min_variance_retention=0.99)
    assert expected in str(caught.value) and "zero" not in str(caught.value)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_all_zero_adapter_is_still_called_zero(tmp_path, capsys):
    folder = tmp_path / "untrained"
    peft_llama(0, init_lora_weights=True).save_pretrained(folder)
    status, out, err = run(capsys, folder)
    assert status == 0, err
    assert "every LoRA delta is zero" in out and "no rank in" not in out
    status, out, err = run(capsys, folder, "--out", tmp_path / "o")
    assert_one_line_error(status, out, err, "every LoRA delta is zero")
    # No rule gives an untrained adapter a rank: not one per module, not a budget spread by energy.
    for extra in (["--per-module"], ["--rank", "2", "--allocate", "energy"]):
        status, out, err = run(capsys, folder, "--out", tmp_path / "o", *extra)
        assert_one_line_error(status, out, err, "every LoRA delta is zero")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_an_untrained_adapter_gets_no_rank_by_function_nor_budget(tokenizer):
    from tiny_models import SENTENCES

    from lora_monitor.edit.edit import calibration_batches
    from lora_monitor.post_squeeze import budget_ranks_by_energy, recommend_rank_by_function

    model = peft_llama(0, init_lora_weights=True, r=8)
    batches = calibration_batches(SENTENCES[:4], tokenizer, batch_size=2, max_length=16)
    with pytest.raises(
        LoraMonitorError, match=r"every LoRA delta is zero.*the rank by function was not measured"
    ):
        recommend_rank_by_function(model, batches)
    with pytest.raises(
        LoraMonitorError, match=r"every LoRA delta is zero.*no ranks were chosen for the budget"
    ):
        budget_ranks_by_energy(model, 10**6)


@pytest.mark.slow
def test_callback_says_which_rank_came_closest(tmp_path, lm_dataset, caplog, capsys):
    callback = PostSqueezeCallback(min_variance_retention=0.999, compress=True, candidate_ranks=[1])
    with caplog.at_level(logging.WARNING):
        train(tmp_path, lm_dataset, callback)
    analysis = callback.analysis
    assert analysis is not None and analysis.recommended_rank is None and analysis.num_modules == 14
    expected = f"no rank in [1] keeps 99.9% on average; rank 1 keeps {100 * analysis.mean_variance[1]:.1f}%"
    assert callback.error.startswith("nothing compressed: ") and expected in callback.error
    assert expected in caplog.text and "zero" not in caplog.text
    assert expected in capsys.readouterr().out
    assert not (tmp_path / "run" / "squeezed").exists()
    manifest = json.loads((tmp_path / "run" / "squeeze_manifest.json").read_text())
    assert manifest["no_recommendation"] == expected


# ---- item 8: PEFT's layout for an adapter named foo --------------------------------------------------------


def test_named_adapter_layout_points_to_adapter_name(tmp_path, capsys):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(0), config, adapter_name="foo")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "foo" / "adapter_config.json").is_file()  # PEFT's layout

    for call in (lambda: load_adapter(tmp_path / "saved"), lambda: analyze_adapter(tmp_path / "saved")):
        with pytest.raises(LoraMonitorError) as caught:
            call()
        assert "--adapter-name foo" in str(caught.value) and str(tmp_path / "saved" / "foo") in str(
            caught.value
        )
        assert "not a PEFT adapter folder" not in str(caught.value)
    status, out, err = run(capsys, tmp_path / "saved")
    assert_one_line_error(status, out, err, "--adapter-name foo")

    # and both ways the message offers work
    by_name = analyze_adapter(tmp_path / "saved", adapter_name="foo")
    assert by_name.num_modules == 4 and by_name.source_rank == 4
    assert analyze_adapter(tmp_path / "saved" / "foo").mean_variance == by_name.mean_variance
    status, _, err = run(capsys, tmp_path / "saved", "--adapter-name", "foo")
    assert status == 0, err
    # onto its base (what --base needs): the adapter in the sub-folder, with its own factors
    from lora_monitor.adapters.base_model import load_onto_base

    tiny_llama(0).save_pretrained(tmp_path / "base")
    loaded = load_onto_base(tmp_path / "saved", tmp_path / "base", "foo")
    saved_B = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["foo"].weight
    assert torch.equal(
        loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight, saved_B
    )
