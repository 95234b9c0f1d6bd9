"""Files go where a user expects them: the examples' default output folder is ignored by git, and the
examples' model cache moves with LORA_MONITOR_CACHE."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _default_outputs() -> list[str]:
    """The default output folders the examples name (``--out`` in the scripts, the second argument of the
    shell scripts)."""
    found = []
    for script in EXAMPLES.glob("*.py"):
        found += re.findall(r'"--out",\s*default="([^"]+)"', script.read_text())
    for script in EXAMPLES.glob("*.sh"):
        found += re.findall(r'out="\$\{2:-([^}]+)\}"', script.read_text())
    return found


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_every_default_output_folder_is_ignored_by_git():
    outputs = [*_default_outputs(), "lora-monitor-demo"]  # the demo's default --out
    assert len(outputs) >= 6
    for folder in outputs:
        assert folder.startswith("runs/") or folder == "lora-monitor-demo", folder
        probe = f"{folder}/adapter/adapter_model.safetensors"
        result = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, check=False)
        assert result.returncode == 0, f"{probe} is not ignored by .gitignore"


def test_the_example_cache_follows_lora_monitor_cache(tmp_path, monkeypatch):
    def cache_folder() -> Path:
        spec = importlib.util.spec_from_file_location("offline_assets_probe", EXAMPLES / "offline_assets.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.CACHE

    monkeypatch.delenv("LORA_MONITOR_CACHE", raising=False)
    assert cache_folder() == Path.home() / ".cache" / "lora-monitor"
    monkeypatch.setenv("LORA_MONITOR_CACHE", str(tmp_path / "cache"))
    assert cache_folder() == tmp_path / "cache"
