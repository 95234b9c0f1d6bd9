"""Old keyword names that keep working for one release, with a :class:`DeprecationWarning` naming the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import LoraMonitorError

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """A decorator: ``old=...`` is passed on as ``new=...`` (``renamed_keywords(old="new")``), with a
    :class:`DeprecationWarning`; giving both is a :class:`LoraMonitorError`."""

    def decorate(function: F) -> F:
        name = function.__qualname__.removesuffix(".__init__")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise LoraMonitorError(f"{name}: give {new} (the new name of {old}), not both")
                warnings.warn(
                    f"{name}({old}=...) is deprecated and will be removed in the next release: use {new}=...",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
