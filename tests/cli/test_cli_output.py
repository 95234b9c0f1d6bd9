"""The command's output levels: --quiet prints the results and errors only, --verbose adds progress bars."""

from __future__ import annotations

import pytest
from dense_reference import decay_spectrum
from tiny_models import peft_llama

from lora_monitor.cli import main


@pytest.fixture()
def adapter_with_wrong_source_rank(tmp_path):
    """A TOML file naming a rank-16 adapter with ``source_rank = 32``: the command warns that it is not."""
    folder = tmp_path / "adapter"
    decay_spectrum(peft_llama(0, r=16, lora_alpha=32)).save_pretrained(folder)
    config = tmp_path / "squeeze.toml"
    config.write_text(f'[squeeze]\nadapter_path = "{folder}"\nsource_rank = 32\n')
    return config


def test_quiet_keeps_the_results_and_drops_the_warning(capsys, adapter_with_wrong_source_rank):
    assert main(["squeeze", str(adapter_with_wrong_source_rank)]) == 0
    normal = capsys.readouterr()
    assert "source_rank 32" in normal.err and "Energy rank" in normal.out
    assert main(["squeeze", str(adapter_with_wrong_source_rank), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == normal.out


def test_quiet_still_prints_errors(capsys, tmp_path):
    assert main(["squeeze", str(tmp_path / "missing"), "-q"]) == 2
    assert "missing" in capsys.readouterr().err


def test_verbose_shows_the_progress_bars(capsys, adapter_with_wrong_source_rank):
    # 14 modules: too few for a progress bar by default, and stderr is not a terminal here
    assert main(["squeeze", str(adapter_with_wrong_source_rank), "--verbose"]) == 0
    assert "squeeze: spectra" in capsys.readouterr().err


def test_quiet_and_verbose_exclude_each_other(capsys, adapter_with_wrong_source_rank):
    with pytest.raises(SystemExit):
        main(["squeeze", str(adapter_with_wrong_source_rank), "-q", "-v"])
    assert "not allowed with" in capsys.readouterr().err


def test_the_output_level_holds_for_the_command_only(capsys, adapter_with_wrong_source_rank):
    import logging
    import warnings

    logger = logging.getLogger("lora_monitor")
    before = (logger.level, list(logger.handlers), list(warnings.filters))
    for flag in ("-q", "-v"):
        assert main(["squeeze", str(adapter_with_wrong_source_rank), flag]) == 0
        assert (logger.level, list(logger.handlers), list(warnings.filters)) == before


@pytest.mark.slow
def test_a_library_first_imported_by_the_command_gets_its_own_defaults_back(tmp_path):
    # In a fresh interpreter, as in a notebook: `allocate` first imports transformers, which reads the command's
    # quiet level from the environment once; afterwards the process has transformers' default level again.
    import subprocess
    import sys

    from tiny_models import tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "model")
    script = (
        "import sys, os\n"
        "from lora_monitor.cli import main\n"
        "assert 'transformers' not in sys.modules\n"
        "assert main(['allocate', sys.argv[1], '-q']) == 0\n"
        "from transformers.utils import logging\n"
        "print(logging.get_verbosity() == logging.WARNING,\n"
        "      'TRANSFORMERS_VERBOSITY' in os.environ, 'HF_HUB_DISABLE_PROGRESS_BARS' in os.environ)\n"
    )
    environment = {
        key: value
        for key, value in __import__("os").environ.items()
        if key not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[-3:] == ["True", "False", "False"]
