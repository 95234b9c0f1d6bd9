"""Features return data; the command and the callbacks print it through ``lora_monitor.render``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tiny_models import peft_llama

import lora_monitor
from lora_monitor.post_squeeze import SqueezeOptions, squeeze_trained_adapter

PACKAGE = Path(lora_monitor.__file__).parent
# What may import render/: the public API (write_report), the tables' room, the command, the bindings.
CALLERS = {"__init__.py", "render", "cli", "callbacks"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as an absolute dotted name (relative imports resolved)."""
    package = ["lora_monitor", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_feature_imports_render():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if ".render" in name)
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in CALLERS
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    # the scan sees relative imports (end_of_training imported the console as `..render.console`)
    assert "lora_monitor.render.console" in imported_modules(PACKAGE / "cli" / "squeeze.py")


def test_the_end_of_training_prints_nothing(tmp_path, capsys):
    result = squeeze_trained_adapter(peft_llama(0), tmp_path / "run", SqueezeOptions(), intruders=False)
    assert result.analysis.recommended_rank is not None
    assert capsys.readouterr().out == ""
    with pytest.warns(DeprecationWarning, match=r"print_tables=\.\.\.\) is deprecated and does nothing"):
        squeeze_trained_adapter(peft_llama(0), tmp_path / "again", SqueezeOptions(), print_tables=True)
    assert capsys.readouterr().out == ""
