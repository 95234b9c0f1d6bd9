"""The wheel is the product: a wheel and an sdist built from this checkout hold every package, the type
marker, the license and the command, at the version the code declares.

The source tree is copied first (without .git, build outputs or developer symlinks), so that the build
writes nothing into the checkout and sees what a clean clone holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lora_monitor

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
# callbacks/ sits at the top of the repository and is installed as lora_monitor.callbacks (package-dir).
SOURCES = {"lora_monitor": ROOT / "lora_monitor", "lora_monitor.callbacks": ROOT / "callbacks"}
LEFT_OUT = {".git", "build", "dist", "runs", "wandb", "__pycache__", ".pytest_cache", ".ruff_cache"}


def modules_on_disk() -> set[str]:
    """Every ``.py`` file of the installed packages, as the path it has inside a wheel.

    ``os.walk`` does not follow links: a developer's ``lora_monitor/callbacks -> ../callbacks`` link is
    not a package of its own."""
    found = set()
    for top, folder in SOURCES.items():
        for where, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            inside = Path(top.replace(".", "/")) / Path(where).relative_to(folder)
            found |= {(inside / name).as_posix() for name in files if name.endswith(".py")}
    return found


def packages_on_disk() -> set[str]:
    """Every folder of the source tree that holds an ``__init__.py``, as the dotted name it installs as."""
    return {
        name.removesuffix("/__init__.py").replace("/", ".")
        for name in modules_on_disk()
        if name.endswith("/__init__.py")
    }


def declared_packages() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return set(tomllib.load(file)["tool"]["setuptools"]["packages"])


def test_every_package_on_disk_is_declared():
    assert packages_on_disk() - declared_packages() == set(), "add these to [tool.setuptools] packages"
    assert declared_packages() - packages_on_disk() == set(), "these declared packages have no __init__.py"


def _clean_copy(target: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {
            name
            for name in names
            if name in LEFT_OUT or name.endswith(".egg-info") or (Path(folder) / name).is_symlink()
        }

    return Path(shutil.copytree(ROOT, target / "source", ignore=ignore))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A wheel and an sdist built from a clean copy of the checkout (setuptools from this environment)."""
    scratch = tmp_path_factory.mktemp("build")
    source = _clean_copy(scratch)
    out = scratch / "dist"
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])",
                str(out),
            ],
            cwd=source,
            capture_output=True,
            text=True,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow  # builds a wheel
def test_the_wheel_holds_every_package_and_the_command(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    in_wheel = {str(Path(name).parent).replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packages_on_disk() - in_wheel == set(), "packages missing from the built wheel"
    assert modules_on_disk() - set(names) == set(), "modules missing from the built wheel"
    assert "lora_monitor/py.typed" in names
    version = lora_monitor.__version__
    dist_info = f"lora_monitor-{version}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    wheel = zipfile.ZipFile(built["wheel"])
    assert "lora-monitor = lora_monitor.cli:main" in wheel.read(f"{dist_info}/entry_points.txt").decode()
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    # Nothing of the developer's tree rides along: tests, benchmarks and examples are not packages.
    assert not any(name.split("/")[0] in {"tests", "bench", "examples"} for name in names)


@pytest.mark.slow  # builds an sdist
def test_the_sdist_holds_the_license_and_every_source(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "LICENSE",
        "pyproject.toml",
        "README.md",
        "lora_monitor/py.typed",
        "callbacks/__init__.py",
    } <= names
    assert {f"{package.replace('.', '/')}/__init__.py" for package in packages_on_disk()} - {
        name.replace("callbacks/", "lora_monitor/callbacks/", 1) if name.startswith("callbacks/") else name
        for name in names
    } == set()


def test_version_option_prints_the_version(capsys):
    from lora_monitor.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"lora-monitor {lora_monitor.__version__}\n"
