"""The report: plots and HTML from a real monitored and squeezed Trainer run, rendered in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from tiny_models import make_lm_dataset, peft_llama, training_args

from lora_monitor import LoraMonitorError
from lora_monitor.render.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    from transformers import Trainer

    from lora_monitor.callbacks import PostSqueezeCallback, SpectralMonitorCallback

    output = tmp_path_factory.mktemp("run")
    trainer = Trainer(
        model=peft_llama(init_lora_weights=True),
        args=training_args(output, max_steps=8),
        train_dataset=make_lm_dataset(tokenizer),
        callbacks=[
            SpectralMonitorCallback(every_n_steps=2),
            PostSqueezeCallback(print_table=False, report=True),
        ],
    )
    trainer.train()
    # The callback drew the report at the end of training, the monitor's last check (step 8) included.
    assert (output / "report.html").is_file() and (output / "dominance.png").is_file()
    assert "last at step 8" in (output / "report.html").read_text()
    return output


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.slow
def test_report_holds_every_plot_and_table(run_dir, tmp_path):
    from PIL import Image

    report = write_report(run_dir, tmp_path / "report")
    page = report.read_text()
    for name in ("retention.png", "spectra.png", "effective_rank_heatmap.png", "dominance.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000
    images = embedded_images(page)
    assert len(images) == 4
    for data in images:
        picture = Image.open(io.BytesIO(data))
        assert picture.size[0] > 400 and picture.size[1] > 200
    assert "recommended" in page and "Modules at the last check" in page
    assert "model.layers.1.mlp.down_proj" in page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_its_plots_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    report = write_report(run_dir, tmp_path / "report")
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', report.read_text()))

    def colored_pixels(page) -> int:
        shot = tmp_path / f"{page.stem}.png"
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,4000", f"--screenshot={shot}",
            page.as_uri(),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        pixels = Image.open(shot).convert("RGB").getdata()
        # Text and table borders are grey; the plots' lines, bands and heat map are saturated colour.
        return sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60)

    with_plots, without_plots = colored_pixels(report), colored_pixels(blank)
    assert with_plots > 50_000 and without_plots < 1_000, (with_plots, without_plots)


def test_bad_run_folders(tmp_path, capsys):
    from lora_monitor.cli import main

    with pytest.raises(LoraMonitorError, match="holds neither"):
        write_report(tmp_path)
    (tmp_path / "lora_monitor.jsonl").write_text("{broken\n")
    with pytest.raises(LoraMonitorError, match="line 1 is not JSON"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"1\n", "line 1 is not a monitor record (a JSON object with a step)"),
        (b'{"modules": []}\n', "line 1 is not a monitor record (a JSON object with a step)"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file (invalid start byte at byte 0)"),
    ],
)
def test_a_monitor_file_lora_monitor_did_not_write_is_one_error_naming_its_line(tmp_path, content, message):
    (tmp_path / "lora_monitor.jsonl").write_bytes(content)
    with pytest.raises(LoraMonitorError) as refused:
        write_report(tmp_path, tmp_path / "out")
    assert str(refused.value) == f"{tmp_path / 'lora_monitor.jsonl'}: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the module's Trainer run
def test_a_field_the_report_cannot_read_writes_no_part_of_it(run_dir, tmp_path):
    # A manifest without min_variance and a check whose effective rank is text: before, a KeyError and a
    # TypeError, the second after retention.png and spectra.png were written into the new folder.
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    manifest = json.loads((broken / "squeeze_manifest.json").read_text())
    del manifest["min_variance"]
    (broken / "squeeze_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraMonitorError, match=r"KeyError: 'min_variance'\); nothing was written$"):
        write_report(broken, tmp_path / "out")
    shutil.copy(run_dir / "squeeze_manifest.json", broken)
    lines = (broken / "lora_monitor.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["modules"][0]["effective_rank"] = "x"
    (broken / "lora_monitor.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    with pytest.raises(LoraMonitorError) as refused:
        write_report(broken, tmp_path / "out")
    assert str(refused.value).startswith(
        f"{broken}: the report cannot read a field of lora_monitor.jsonl and "
    )
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("mine")
    for output, message in [
        (tmp_path / "a_file", "is a file, not a folder for the report"),
        (tmp_path / "a_file" / "x", "cannot write here"),
    ]:
        with pytest.raises(LoraMonitorError, match=message):
            write_report(run_dir, output)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_without_matplotlib_the_report_says_what_to_install(tmp_path, monkeypatch):
    # The error that guards against unreadable fields must not reword this one as a bad field of the run.
    import sys

    from lora_monitor import analyze_adapter
    from lora_monitor._io import json_safe

    analysis = analyze_adapter(peft_llama(0), progress=False)
    (tmp_path / "squeeze_manifest.json").write_text(json.dumps(json_safe(analysis.to_dict())))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives import
    with pytest.raises(LoraMonitorError) as refused:
        write_report(tmp_path, tmp_path / "out")
    assert str(refused.value) == "drawing the report needs matplotlib: pip install 'lora-monitor[plot]'"
    assert not (tmp_path / "out").exists()


def test_report_of_an_untrained_adapter_has_no_retention_to_draw(tmp_path):
    """B = 0 everywhere: the squeeze analysis holds nulls, and the report says so instead of failing."""
    from lora_monitor import analyze_adapter
    from lora_monitor._io import json_safe

    analysis = analyze_adapter(peft_llama(init_lora_weights=True), progress=False)
    assert analysis.recommended_rank is None
    (tmp_path / "squeeze_manifest.json").write_text(json.dumps(json_safe(analysis.to_dict())))
    page = write_report(tmp_path).read_text()
    assert "—" in page and not (tmp_path / "retention.png").exists()


@pytest.mark.slow  # the module's Trainer run
def test_heat_map_leaves_out_the_checks_where_every_delta_is_still_zero(run_dir):
    import math

    from lora_monitor.render.report import effective_rank_grid, load_monitor_records

    records = load_monitor_records(run_dir)
    # PEFT's default init: B = 0 at step 0, so no module has an effective rank there (undefined, not 1)
    assert records[0]["step"] == 0
    assert all(m["effective_rank"] is None for m in records[0]["modules"])
    grid = effective_rank_grid(records)
    assert grid.left_out_steps == [0]
    assert grid.steps == [r["step"] for r in records[1:]]
    assert len(grid.values) == len(grid.names) == len(records[-1]["modules"])
    for column in range(len(grid.steps)):  # no blank column is left
        assert any(not math.isnan(row[column]) for row in grid.values)
    first = {m["name"]: m["effective_rank"] for m in records[1]["modules"]}
    assert [row[0] for row in grid.values] == [first[name] for name in grid.names]
