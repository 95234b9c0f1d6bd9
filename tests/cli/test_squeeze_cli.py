"""The ``lora-monitor squeeze`` command: table, JSON, compression, the TOML config, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from dense_reference import lora_layers
from peft import PeftModel
from squeeze_command import run
from tiny_models import tiny_llama

from lora_monitor.post_squeeze import analyze_adapter


def reloaded_ranks(folder):
    model = PeftModel.from_pretrained(tiny_llama(0), folder)
    return {name: layer.r["default"] for name, layer in lora_layers(model).items()}


def test_table_recommendation_and_compression(tmp_path, capsys, adapter_folder):
    expected = analyze_adapter(adapter_folder, min_variance_retention=0.9).recommended_rank
    status, out, _ = run(capsys, adapter_folder, "--threshold", "0.9", "--out", tmp_path / "out")
    assert status == 0
    marked = [line for line in out.splitlines() if "<--" in line]
    assert len(marked) == 1 and f" {expected} " in marked[0]
    assert f"Energy rank: {expected} " in out
    assert (
        "an upper bound, not a checked rank, in four of the five settings" in out
    )  # no --data: the energy rank is not the answer
    assert "Wrote" in out
    assert set(reloaded_ranks(tmp_path / "out").values()) == {expected}


def test_json_with_chosen_ranks(capsys, adapter_folder):
    status, out, _ = run(capsys, adapter_folder, "--ranks", "3,5", "--json")
    assert status == 0
    payload = json.loads(out)
    analysis = analyze_adapter(adapter_folder, candidate_ranks=[3, 5])
    assert payload["analysis"]["target_ranks"] == [3, 5]
    assert payload["analysis"]["mean_variance"]["3"] == pytest.approx(analysis.mean_variance[3])
    assert payload["compressed"] is None


@pytest.mark.slow
def test_rank_and_per_module(tmp_path, capsys, adapter_folder):
    assert run(capsys, adapter_folder, "--rank", "3", "--out", tmp_path / "uniform")[0] == 0
    assert set(reloaded_ranks(tmp_path / "uniform").values()) == {3}
    status, out, _ = run(
        capsys, adapter_folder, "--per-module", "--threshold", "0.99", "--out", tmp_path / "per", "--json"
    )
    assert status == 0
    analysis = analyze_adapter(adapter_folder, min_variance_retention=0.99)
    expected = {m.name: m.minimal_rank for m in analysis.modules}
    assert json.loads(out)["compressed"]["ranks"] == expected
    assert reloaded_ranks(tmp_path / "per") == expected


@pytest.mark.slow
def test_toml_config(tmp_path, capsys, adapter_folder):
    config = tmp_path / "squeeze.toml"
    config.write_text(
        f"""
[squeeze]
adapter_path = "{adapter_folder}"
min_variance_retention = 0.9
candidate_ranks = [2, 4, 16]
output_path = "{tmp_path / "squeezed"}"
compress_to = 0
device = "cpu"

[model]
lora_rank = 16
"""
    )
    status, out, err = run(capsys, config)
    assert status == 0, err
    expected = analyze_adapter(adapter_folder, min_variance_retention=0.9, candidate_ranks=[2, 4, 16])
    assert f"Energy rank: {expected.recommended_rank} " in out
    assert set(reloaded_ranks(tmp_path / "squeezed").values()) == {expected.recommended_rank}
    assert "warning" not in err
    # compress_to picks the rank; a command-line option overrides the file; a wrong source_rank warns
    config.write_text(config.read_text().replace("compress_to = 0", "compress_to = 8\nsource_rank = 32"))
    status, _, err = run(capsys, config, "--out", tmp_path / "eight")
    assert status == 0
    assert "source_rank 32" in err
    assert set(reloaded_ranks(tmp_path / "eight").values()) == {8}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[other]\nx = 1\n", "no [squeeze] table"),
        ("[squeeze]\nmin_variance_retention = 0.9\n", "needs adapter_path"),
        ('[squeeze]\nadapter_path = "x"\nthreshold = 0.9\n', "unknown key"),
        ('[squeeze]\nadapter_path = "x"\ncandidate_ranks = "4,8"\n', "candidate_ranks"),
        ("[squeeze\n", "not valid TOML"),
    ],
)
def test_bad_toml(tmp_path, capsys, body, message):
    config = tmp_path / "bad.toml"
    config.write_text(body)
    status, out, err = run(capsys, config)
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "0", "--out", "OUT"], "target_rank"),
        (["--rank", "-2", "--out", "OUT"], "target_rank"),
        (["--threshold", "1.5"], "min_variance_retention"),
        (["--threshold", "0"], "min_variance_retention"),
        (["--rank", "4"], "--out"),
        (["--ranks", "4,x"], "--ranks"),
        (["--out", "INPUT"], "input adapter folder"),
    ],
)
def test_bad_options(tmp_path, capsys, adapter_folder, extra, message):
    before = {p.name: p.read_bytes() for p in adapter_folder.iterdir()}
    extra = [
        str(adapter_folder) if a == "INPUT" else str(tmp_path / "out") if a == "OUT" else a for a in extra
    ]
    status, out, err = run(capsys, adapter_folder, *extra)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in adapter_folder.iterdir()} == before


def test_installed_command_fails_cleanly_on_a_missing_folder(tmp_path):
    command = shutil.which("lora-monitor")
    argv = [command] if command else [sys.executable, "-m", "lora_monitor.cli"]
    completed = subprocess.run(
        [*argv, "squeeze", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such adapter folder" in lines[0], completed.stderr


# An edit whose paths all pass the command's checks (see the test below).
EDIT_ARGUMENTS = ["edit", "{adapter}", "--base", "{model}", "--data", "{file}", "--out", "{tmp}/out"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--help"], None),
        (["squeeze", "{missing}", "--rank", "4", "--out", "{tmp}/out"], "{missing}: no such adapter folder"),
        (["squeeze", "{missing}.toml"], "{missing}.toml: no such TOML file"),
        (
            ["squeeze", "{file}"],
            "{file}: is a file, not an adapter folder; give the folder that holds adapter_config.json",
        ),
        (
            ["squeeze", "{empty}"],
            "{empty}: no adapter_config.json here, so this is not a PEFT adapter folder",
        ),
        (["squeeze", "{toml}"], "{empty}: no adapter_config.json here, so this is not a PEFT adapter folder"),
        (
            ["analyze", "{multi}"],
            "{multi}: no adapter_config.json here, but PEFT saved adapter(s) ['sql'] in sub-folders: pass "
            "--adapter-name sql (adapter_name='sql'), or give {multi}/sql",
        ),
        (
            ["analyze", "{multi}", "--adapter-name", "chat"],
            "{multi}: no adapter named 'chat' (adapters in sub-folders: ['sql'])",
        ),
        # a name, never a path out of the folder (it read the folder next to it) or the folder itself
        (
            ["analyze", "{multi}", "--adapter-name", "../x"],
            "{multi}: adapter name '../x' is not the name of an adapter (PEFT saves an adapter named foo in the "
            "sub-folder foo; adapters in sub-folders: ['sql'])",
        ),
        (
            ["analyze", "{multi}", "--adapter-name", ""],
            "{multi}: adapter name '' is not the name of an adapter (PEFT saves an adapter named foo in the "
            "sub-folder foo; adapters in sub-folders: ['sql'])",
        ),
        (["analyze", "{adapter}", "--base", "{missing}"], "{missing}: no such base model folder"),
        (
            ["analyze", "{adapter}", "--base", "{tmp}"],
            "{tmp}: no config.json (expected a model saved with save_pretrained)",
        ),
        (
            ["allocate", "{file}"],
            "{file}: is a file, not a model folder; expected a model saved with save_pretrained",
        ),
        (
            ["edit", "{adapter}", "--base", "{model}", "--data", "{tmp}", "--out", "{tmp}/out"],
            "{tmp}: is a folder, not a data file",
        ),
        (["report", "{missing}"], "{missing}: no such run folder"),
        (
            ["squeeze", "{adapter}", "--base", "{model}", "--data", "{file}", "--tokenizer", "{missing}"],
            "{missing}: no such tokenizer folder",
        ),
        # the options are checked before anything is read from the folders (which hold only a config)
        (
            ["squeeze", "{adapter}", "--rank", "4"],
            "--rank, --per-module and --allocate choose how to compress: give --out DIR as well",
        ),
        (
            ["squeeze", "{adapter}", "--threshold", "2"],
            "min_variance_retention must be above 0 and at most 1, got 2.0 (0.95 = keep 95%)",
        ),
        (
            ["squeeze", "{adapter}", "--ranks", "0,4"],
            "every rank of candidate_ranks must be at least 1, got 0",
        ),
        (["allocate", "{model}", "--fraction", "0"], "layer_fraction must be above 0 and at most 1, got 0.0"),
        (
            ["squeeze", "{adapter}", "--base", "{model}", "--data", "{file}", "--tolerance", "-0.1"],
            "tolerance must be at least 0, got -0.1 (0.01 = allow 1% more held-out loss)",
        ),
        (
            ["squeeze", "{adapter}", "--base", "{model}", "--data", "{file}", "--min-loss-retention", "1.5"],
            "--min-loss-retention must be above 0 and at most 1, got 1.5 (0.95 = keep 95%)",
        ),
        (
            ["squeeze", "{adapter}", "--base", "{model}", "--data", "{file}", "--batch-size", "0"],
            "batch_size must be at least 1, got 0",
        ),
        (
            [*EDIT_ARGUMENTS, "--core-frac", "2"],
            "core_frac must be at least 0 and at most 1, got 2.0",
        ),
        (
            [*EDIT_ARGUMENTS, "--samples", "-1"],
            "max_samples must be at least 0, got -1 (0 = every text)",
        ),
    ],
    ids=[
        "help",
        "squeeze-missing",
        "toml-missing",
        "squeeze-file",
        "squeeze-no-config",
        "toml-adapter-no-config",
        "adapter-in-sub-folder",
        "no-such-adapter-name",
        "adapter-name-a-path",
        "adapter-name-empty",
        "base-missing",
        "base-no-config",
        "allocate",
        "edit",
        "report",
        "squeeze-tokenizer-missing",
        "rank-without-out",
        "threshold",
        "ranks",
        "allocate-fraction",
        "squeeze-tolerance",
        "squeeze-min-loss-retention",
        "squeeze-batch-size",
        "edit-core-frac",
        "edit-samples",
    ],
)
def test_help_a_wrong_input_path_or_option_is_answered_before_torch_is_imported(tmp_path, arguments, message):
    # Importing torch and PEFT takes a second or more: the command answers these without them.
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / "empty").mkdir()
    (tmp_path / "squeeze.toml").write_text(f'[squeeze]\nadapter_path = "{tmp_path / "empty"}"\n')
    for config in ("adapter/adapter_config.json", "multi/sql/adapter_config.json", "model/config.json"):
        (tmp_path / config).parent.mkdir(parents=True)
        (tmp_path / config).write_text("{}")
    fill = {
        "missing": str(tmp_path / "missing"),
        "tmp": str(tmp_path),
        "file": str(tmp_path / "notes.txt"),
        "adapter": str(tmp_path / "adapter"),
        "multi": str(tmp_path / "multi"),
        "model": str(tmp_path / "model"),
        "empty": str(tmp_path / "empty"),
        "toml": str(tmp_path / "squeeze.toml"),
    }
    argv = [argument.format(**fill) for argument in arguments]
    script = (
        "import sys\n"
        "from lora_monitor.cli import main\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "print('torch' in sys.modules, status)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip().splitlines()[-1] == ("False 0" if message is None else "False 2"), (
        completed
    )
    if message is not None:
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == f"lora-monitor {argv[0]}: error: {message.format(**fill)}", (
            lines
        )


@pytest.mark.slow
def test_rank_by_function_on_a_saved_adapter(tmp_path, capsys, adapter_folder, tokenizer):
    from tiny_models import SENTENCES

    from lora_monitor.adapters.base_model import load_onto_base
    from lora_monitor.edit import calibration_batches
    from lora_monitor.post_squeeze.held_out import recommend_rank_by_function

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(SENTENCES[:12]))
    arguments = [adapter_folder, "--base", tmp_path / "base", "--data", data, "--ranks", "1,2,4,8,16"]
    status, out, _ = run(capsys, *arguments, "--by-module-type", "--tolerance", "0.002", "--json")
    assert status == 0
    payload = json.loads(out)["function"]
    # the same numbers as the API on the same model and batches
    model = load_onto_base(adapter_folder, tmp_path / "base")
    batches = calibration_batches(SENTENCES[:12], tokenizer, batch_size=8, max_length=256, max_samples=64)
    direct = recommend_rank_by_function(
        model, batches, ranks=[1, 2, 4, 8, 16], tolerance=0.002, by_module_type=True, progress=False
    )
    assert payload["recommended_rank"] == direct.recommended_rank
    assert payload["type_recommended_ranks"] == direct.type_recommended_ranks
    assert payload["evaluations"]["4"]["loss"] == pytest.approx(direct.evaluations[4].loss, rel=1e-6)

    status, out, _ = run(capsys, *arguments, "--tolerance", "0.002", "--out", tmp_path / "out")
    assert status == 0 and "by function" in out
    assert "Energy rank:" in out and "upper bound" not in out  # a checked rank is printed beside it
    assert set(reloaded_ranks(tmp_path / "out").values()) == {direct.recommended_rank}

    # the default rule, at a share of its own
    status, out, _ = run(capsys, *arguments, "--min-loss-retention", "0.8", "--json")
    assert status == 0
    payload = json.loads(out)["function"]
    direct = recommend_rank_by_function(
        model, batches, ranks=[1, 2, 4, 8, 16], min_loss_retention=0.8, progress=False
    )
    assert payload["rule"] == "retention" and payload["min_loss_retention"] == 0.8
    assert payload["recommended_rank"] == direct.recommended_rank

    status, _, err = run(capsys, adapter_folder, "--data", data)
    assert status == 2 and "--base and --data go together" in err


@pytest.mark.slow
def test_allocate_spends_the_budget_of_a_rank_per_module(tmp_path, capsys, adapter_folder, tokenizer):
    from tiny_models import SENTENCES

    from lora_monitor.post_squeeze import budget_ranks_by_energy, uniform_budget

    status, out, _ = run(
        capsys, adapter_folder, "--rank", "4", "--allocate", "energy", "--out", tmp_path / "e"
    )
    assert status == 0 and "Allocated by energy" in out
    expected = budget_ranks_by_energy(adapter_folder, uniform_budget(adapter_folder, 4))
    ranks = reloaded_ranks(tmp_path / "e")
    assert {name.removeprefix("base_model.model."): rank for name, rank in ranks.items()} == (
        expected.module_ranks
    )
    assert len(set(ranks.values())) > 1  # the decaying spectra differ per module: so do the ranks

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(SENTENCES[:12]))
    sensitivity = [adapter_folder, "--rank", "4", "--allocate", "sensitivity", "--ranks", "1,2,4,8,16"]
    status, out, _ = run(
        capsys, *sensitivity, "--base", tmp_path / "base", "--data", data, "--out", tmp_path / "s", "--json"
    )
    assert status == 0
    payload = json.loads(out)
    allocation = payload["allocation"]
    assert allocation["method"] == "sensitivity" and allocation["parameters"] <= allocation["budget"]
    assert set(allocation["type_ranks"]) == set(payload["function"]["type_evaluations"])
    assert set(reloaded_ranks(tmp_path / "s").values()) == set(allocation["type_ranks"].values())

    status, _, err = run(capsys, adapter_folder, "--allocate", "sensitivity", "--out", tmp_path / "x")
    assert status == 2 and "give --base and --data" in err and not (tmp_path / "x").exists()
    status, _, err = run(capsys, adapter_folder, "--allocate", "energy")
    assert status == 2 and "give --out DIR" in err


@pytest.mark.slow
def test_no_adapter_is_written_from_a_loss_over_no_token(tmp_path, capsys, adapter_folder, tokenizer):
    # Issue 29: held-out texts of one token each (a causal LM has nothing to predict in them) gave a NaN
    # loss, "Recommended rank: 16" (every comparison with NaN is false) and an adapter written from it.
    from tiny_models import SENTENCES

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # what saving printed
    one_token = tmp_path / "one_token.txt"
    one_token.write_text("adapter\nrank\nthe\n")
    base = ["--base", tmp_path / "base", "--batch-size", "1", "--ranks", "1,2,4,8,16"]
    status, out, err = run(capsys, adapter_folder, *base, "--data", one_token, "--out", tmp_path / "out")
    assert status == 2 and out == "" and "Traceback" not in err
    # (the lines before it are transformers' progress bars loading the base model)
    assert err.strip().splitlines()[-1] == (
        f"lora-monitor squeeze: error: {one_token}: no token is scored in 3 batch(es): every label is -100 or "
        "every text is a single token (a causal LM predicts each token from the ones before); give texts "
        "with labels to predict"
    )
    assert not (tmp_path / "out").exists()
    # A one-token text among others, one text per batch: left out, counted, and the advice is the others'.
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(["adapter", *SENTENCES[:6]]))
    status, out, err = run(capsys, adapter_folder, *base, "--data", mixed, "--json", "--out", tmp_path / "ok")
    assert status == 0, err
    function = json.loads(out)["function"]
    assert function["unscored_texts"] == 1 and function["full_loss"] is not None
    clean = tmp_path / "clean.txt"
    clean.write_text("\n".join(SENTENCES[:6]))
    status, out, _ = run(capsys, adapter_folder, *base, "--data", clean, "--json")
    assert status == 0
    assert json.loads(out)["function"]["full_loss"] == pytest.approx(function["full_loss"], rel=1e-9)
    assert set(reloaded_ranks(tmp_path / "ok").values()) == {function["recommended_rank"]}
    status, out, _ = run(capsys, adapter_folder, *base, "--data", mixed)
    assert status == 0 and "1 text(s) with no scored token left out" in out


@pytest.mark.slow
def test_a_base_with_a_nan_weight_or_a_corrupt_file_gives_no_advice(
    tmp_path, capsys, adapter_folder, tokenizer
):
    # PyTorch's fused attention turns a NaN in a projection into finite logits: the held-out losses looked
    # fine and the command printed a rank by function computed from a broken base.
    from tiny_models import SENTENCES

    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(SENTENCES[:6]))
    base = tiny_llama(0)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[1, 2] = float("nan")
    base.save_pretrained(tmp_path / "nan_base")
    tokenizer.save_pretrained(tmp_path / "nan_base")
    capsys.readouterr()
    arguments = ["--base", tmp_path / "nan_base", "--data", data, "--out", tmp_path / "out"]
    status, out, err = run(capsys, adapter_folder, *arguments)
    assert status == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lora-monitor squeeze: error: {tmp_path / 'nan_base'}: the base model's "
        "model.layers.0.self_attn.q_proj.weight holds NaN or Inf values; no advice is computed from it"
    )
    # a weights file cut short: one error naming the folder, not safetensors' traceback
    tiny_llama(0).save_pretrained(tmp_path / "cut_base")
    tokenizer.save_pretrained(tmp_path / "cut_base")
    (tmp_path / "cut_base" / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    status, out, err = run(capsys, adapter_folder, *arguments[:1], tmp_path / "cut_base", *arguments[2:])
    assert status == 2 and out == "" and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"lora-monitor squeeze: error: {tmp_path / 'cut_base'}: could not load the base model (")
    )
    assert not (tmp_path / "out").exists()


def test_a_data_file_in_another_shape_is_one_error_naming_it(tmp_path, capsys, adapter_folder, tokenizer):
    # Issue 29: {"text": [...]} was read as its keys, the command exited 0 and reported full_loss=None.
    from tiny_models import SENTENCES

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps({"text": SENTENCES[:6]}))
    capsys.readouterr()
    status, out, err = run(
        capsys, adapter_folder, "--base", tmp_path / "base", "--data", data, "--out", tmp_path / "o"
    )
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [
        f"lora-monitor squeeze: error: {data}: holds an object with keys ['text'], not a list of texts; expected "
        'a .txt file (one text per non-empty line), a .jsonl file (one JSON string or {"text": ...} object per '
        'line) or a .json file (a list of strings or of {"text": ...} objects)'
    ]
    assert not (tmp_path / "o").exists()


# ---- issue 29, class 7: a rank above the adapter's own, the README's own TOML ------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--ranks", "4,64"],
        ["--ranks", "4,64", "--out", "OUT"],
        ["--rank", "64", "--out", "OUT"],
        ["--rank", "64", "--allocate", "energy", "--out", "OUT"],
    ],
)
def test_a_rank_above_the_adapters_own_exits_2_and_writes_nothing(tmp_path, capsys, adapter_folder, extra):
    # Issue 29: --ranks 4,64 on an r=16 adapter printed "Recommended rank: 64"; --rank 64 --out wrote an
    # unchanged copy ("0 of 14 modules compressed") and exited 0.
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    status, out, err = run(capsys, adapter_folder, *extra)
    what = "target rank" if "--ranks" in extra else "target_rank"
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [
        f"lora-monitor squeeze: error: {adapter_folder}: {what} 64 is above the adapter's rank 16: a squeeze "
        "keeps or lowers a rank, give ranks up to 16"
    ]
    assert not (tmp_path / "out").exists()
    # the adapter's own rank is a candidate (the table's full-rank row), and --rank 16 an unchanged copy
    status, out, _ = run(
        capsys, adapter_folder, "--ranks", "4,16", "--rank", "16", "--out", tmp_path / "same"
    )
    assert status == 0 and set(reloaded_ranks(tmp_path / "same").values()) == {16}


def test_the_readmes_own_squeeze_toml_works(tmp_path, capsys, adapter_folder):
    # Issue 29: its `candidate_ranks = []` ("[] = powers of two up to the adapter's rank") was refused.
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("`squeeze.toml`:\n\n```toml\n", 1)[1].split("```", 1)[0]
    assert "candidate_ranks = []" in example
    config = tmp_path / "squeeze.toml"
    config.write_text(
        example.replace('"out/final"', json.dumps(str(adapter_folder))).replace(
            '"out/squeezed"', json.dumps(str(tmp_path / "squeezed"))
        )
    )
    status, out, err = run(capsys, config, "--json")
    assert status == 0, err
    payload = json.loads(out)
    expected = analyze_adapter(adapter_folder, min_variance_retention=0.95)
    assert payload["analysis"]["target_ranks"] == [1, 2, 4, 8, 16] == expected.candidate_ranks
    assert set(reloaded_ranks(tmp_path / "squeezed").values()) == {expected.recommended_rank}
