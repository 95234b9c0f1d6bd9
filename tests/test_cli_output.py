"""The command's output levels: --quiet prints the results and errors only, --verbose adds progress bars."""

from __future__ import annotations

import pytest
from _squeeze_helpers import decay_spectrum
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
