"""SqueezeOptions: one validator for the API, the command, its TOML table and PostSqueezeCallback."""

from __future__ import annotations

import pytest
from dense_reference import decay_spectrum, lora_layers
from peft import PeftModel
from tiny_models import peft_llama, tiny_llama

from lora_monitor.callbacks.post_squeeze import PostSqueezeCallback
from lora_monitor.cli import main
from lora_monitor.errors import LoraMonitorError
from lora_monitor.post_squeeze import SqueezeOptions, analyze_adapter, compress_adapter


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options") / "adapter"
    decay_spectrum(peft_llama(0, r=8, lora_alpha=16)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_variance_retention": 0}, "min_variance_retention must be above 0 and at most 1, got 0"),
        ({"min_variance_retention": "0.9"}, "min_variance_retention must be a number, got '0.9'"),
        ({"min_variance_retention": float("nan")}, "min_variance_retention must be a finite number"),
        ({"candidate_ranks": [4, 0]}, "every rank of candidate_ranks must be at least 1, got 0"),
        ({"candidate_ranks": []}, "candidate_ranks is empty"),
        ({"candidate_ranks": "4,8"}, "candidate_ranks must be a list of ranks"),
        ({"target_rank": 2.5}, "target_rank must be a whole number, got 2.5"),
        ({"target_rank": 2, "per_module": True}, "not both"),
        ({"per_module": "yes"}, "per_module must be true or false"),
    ],
)
def test_the_same_message_from_every_entry(tmp_path, capsys, adapter_folder, options, message):
    with pytest.raises(LoraMonitorError) as direct:
        SqueezeOptions(**options)
    assert message in str(direct.value)
    # the API
    with pytest.raises(LoraMonitorError) as from_api:
        compress_adapter(adapter_folder, tmp_path / "out", **options)
    assert message in str(from_api.value)
    # the callback (built before training: its own arguments may raise)
    callback_keys = {"min_variance_retention", "candidate_ranks", "per_module"}
    if set(options) <= callback_keys:
        with pytest.raises(LoraMonitorError) as from_callback:
            PostSqueezeCallback(**options)
        assert f"PostSqueezeCallback: {message}" in str(from_callback.value)
    # the TOML table names the file (where `candidate_ranks = []` is the README's way to say "the default":
    # TOML has no None; test_an_empty_candidate_ranks_of_a_table_is_the_default)
    if options == {"candidate_ranks": []}:
        return
    toml_key = {"target_rank": "compress_to"}
    lines = [f'adapter_path = "{adapter_folder}"']
    for key, value in options.items():
        text = repr(value).replace("'", '"').replace("True", "true").replace("nan", "nan")
        lines.append(f"{toml_key.get(key, key)} = {text}")
    config = tmp_path / "squeeze.toml"
    config.write_text("[squeeze]\n" + "\n".join(lines) + "\n")
    status = main(["squeeze", str(config)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"{config}: [squeeze]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_toml_per_module_and_command_line_override(tmp_path, capsys, adapter_folder):
    config = tmp_path / "squeeze.toml"
    config.write_text(
        f'[squeeze]\nadapter_path = "{adapter_folder}"\nper_module = true\nmin_variance_retention = 0.9\n'
        f'output_path = "{tmp_path / "per_module"}"\n'
    )
    assert main(["squeeze", str(config)]) == 0
    expected = {
        m.name: max(1, m.minimal_rank)
        for m in analyze_adapter(adapter_folder, min_variance_retention=0.9).modules
    }
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "per_module")
    assert {name: layer.r["default"] for name, layer in lora_layers(reloaded).items()} == expected
    # --rank on the command line replaces the table's per_module
    assert main(["squeeze", str(config), "--rank", "3", "--out", str(tmp_path / "three")]) == 0
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "three")
    assert {layer.r["default"] for layer in lora_layers(reloaded).values()} == {3}
    capsys.readouterr()


def test_num_layers_is_a_deprecated_alias_of_num_modules(adapter_folder):
    analysis = analyze_adapter(adapter_folder)
    assert analysis.num_modules == 14 == analysis.to_dict()["num_modules"]
    with pytest.warns(DeprecationWarning, match="num_modules"):
        assert analysis.num_layers == 14


def test_full_retention_is_reached_within_the_engine_tolerance(adapter_folder):
    # At the full rank every module keeps 100% up to rounding: spectrum.reaches decides, as everywhere.
    analysis = analyze_adapter(adapter_folder, min_variance_retention=1.0, candidate_ranks=[8])
    assert analysis.recommended_rank == 8 == analysis.recommended_rank_weighted


@pytest.mark.slow
def test_the_packages_import_their_names_on_first_use_and_every_public_name_resolves():
    # lora_monitor and its squeeze, allocation and edit packages import a module the first time one of its
    # names is read (the command checks its options before torch is imported); every name in __all__ must
    # resolve.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import lora_monitor, lora_monitor.post_squeeze, lora_monitor.allocation, lora_monitor.edit\n"
        "from lora_monitor.post_squeeze.options import SqueezeOptions\n"
        "from lora_monitor.allocation.options import check_allocation_options\n"
        "from lora_monitor.edit.options import EditConfig, check_batching, edit_config\n"
        "light = 'torch' not in sys.modules\n"
        "packages = (lora_monitor, lora_monitor.post_squeeze, lora_monitor.allocation, lora_monitor.edit)\n"
        "missing = [f'{package.__name__}.{name}' for package in packages\n"
        "           for name in package.__all__ if not hasattr(package, name)]\n"
        "print(light, missing, lora_monitor.post_squeeze.analyze_adapter.__module__, 'torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip().splitlines()[-1] == "True [] lora_monitor.post_squeeze.analysis True", (
        completed
    )


def test_a_rank_above_the_adapters_own_is_refused_by_every_entry(tmp_path, adapter_folder, tokenizer):
    # Issue 29: a candidate above the adapter's rank r=8 kept 100% and was recommended; a target_rank above
    # it wrote an unchanged copy; a module_ranks entry above it was silently capped.
    import re

    from tiny_models import SENTENCES

    from lora_monitor.edit import calibration_batches
    from lora_monitor.post_squeeze import recommend_rank_by_function

    message = (
        f"{adapter_folder}: target rank 16 is above the adapter's rank 8: a squeeze keeps or lowers a rank"
    )
    with pytest.raises(LoraMonitorError, match="^" + re.escape(message)):
        analyze_adapter(adapter_folder, candidate_ranks=[2, 16])
    with pytest.raises(LoraMonitorError, match="^" + re.escape(message)):
        compress_adapter(adapter_folder, tmp_path / "out", candidate_ranks=[2, 16])
    with pytest.raises(
        LoraMonitorError, match=f"^{adapter_folder}: target_rank 16 is above the adapter's rank 8"
    ):
        compress_adapter(adapter_folder, tmp_path / "out", target_rank=16)
    name = analyze_adapter(adapter_folder).modules[0].name
    with pytest.raises(LoraMonitorError, match=r"module_ranks\[.*\] = 9 is above the module's rank 8"):
        compress_adapter(adapter_folder, tmp_path / "out", module_ranks={name: 9})
    assert not (tmp_path / "out").exists()
    model = PeftModel.from_pretrained(tiny_llama(0), adapter_folder)
    batches = calibration_batches(SENTENCES[:4], tokenizer, batch_size=4)
    with pytest.raises(LoraMonitorError, match=r"^candidate rank 16 is above the adapter's rank 8"):
        recommend_rank_by_function(model, batches, ranks=[2, 16], progress=False)
    assert analyze_adapter(adapter_folder, candidate_ranks=[2, 8]).candidate_ranks == [
        2,
        8,
    ]  # its own rank is fine


def test_an_empty_candidate_ranks_of_a_table_is_the_default():
    # TOML has no None: `candidate_ranks = []` in a [squeeze] table means the default ranks, as README says.
    assert (
        SqueezeOptions.from_mapping({"candidate_ranks": []}, "squeeze.toml: [squeeze]").candidate_ranks
        is None
    )
    with pytest.raises(LoraMonitorError, match="candidate_ranks is empty"):  # the API keeps None for that
        SqueezeOptions(candidate_ranks=[])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tolerance": -0.5}, "tolerance must be at least 0, got -0.5"),
        ({"tolerance": "0.01"}, "tolerance must be a number, got '0.01'"),
        ({"compress_to": ""}, "compress_to must be a sub-folder name, got ''"),
    ],
)
def test_squeeze_trained_adapter_checks_its_options_before_anything_is_computed(tmp_path, arguments, message):
    # Issue 29: the tolerance was checked only when evaluation batches came, after the analysis was printed.
    from lora_monitor.post_squeeze import squeeze_trained_adapter

    with pytest.raises(LoraMonitorError) as refused:
        squeeze_trained_adapter(peft_llama(0), tmp_path / "run", SqueezeOptions(), **arguments)
    assert str(refused.value).startswith(message)
    assert not (tmp_path / "run").exists()
