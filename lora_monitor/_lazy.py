"""Packages whose public names are imported the first time they are used.

Importing such a package costs nothing, so that the command's ``--help`` and its checks of the arguments
answer before torch, PEFT and transformers are imported (a second or more): ``lora_monitor`` itself, and
``lora_monitor.post_squeeze``, ``.allocation`` and ``.edit``, whose options the command validates first.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str,
    exports: Mapping[str, tuple[str, ...]],
    renamed: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package named ``package`` (its ``__name__``), whose public
    names live in the modules ``exports`` lists, relative to it (``{".analysis": ("analyze_adapter",)}``).

    A module is imported the first time one of its names is read from the package; the name is then a
    plain attribute of the package (the next read costs nothing).

    ``renamed`` maps a name the package no longer has to where it went, ``"module:name"`` (absolute):
    reading it still works for a release, with a :class:`DeprecationWarning` naming the new place.
    """
    home = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name in renamed:  # never cached: every read of an old name warns
            module, new_name = renamed[name].split(":")
            warnings.warn(
                f"{package}.{name} is deprecated and will be removed in the next release: use "
                f"{module}.{new_name}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(module), new_name)
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})  # the deprecated names are left out

    return __getattr__, __dir__
