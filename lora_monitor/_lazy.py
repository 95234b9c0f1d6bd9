"""Packages whose public names are imported the first time they are used.

Importing such a package costs nothing, so that the command's ``--help`` and its checks of the arguments
answer before torch, PEFT and transformers are imported (a second or more): ``lora_monitor`` itself, and
``lora_monitor.squeeze``, ``.allocation`` and ``.edit``, whose options the command validates first.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package named ``package`` (its ``__name__``), whose public
    names live in the modules ``exports`` lists, relative to it (``{".analysis": ("analyze_adapter",)}``).

    A module is imported the first time one of its names is read from the package; the name is then a
    plain attribute of the package (the next read costs nothing).
    """
    home = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return __getattr__, __dir__
