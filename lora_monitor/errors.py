"""The errors lora-monitor raises on bad input: one class, one clear message naming the file or module.

Options follow one convention, PEFT's: a dataclass checked in ``__post_init__`` with :func:`check_number` and
:func:`check_choice`, whose messages name the option after ``where`` when the caller gives one (the callback
the user built, or the file the options came from: ``"InSqueezeCallback: mode must be one of ..."``); the
library never writes a caller's name itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

Choice = TypeVar("Choice")


class LoraMonitorError(ValueError):
    """Bad input: a missing or corrupt adapter, a model without LoRA, an unknown adapter name, a bad option.

    The message names the file, folder, module or option concerned and what is wrong with it. The command
    line prints it (without a traceback) and exits with status 2.
    """


def named(message: str, where: str = "") -> str:
    """``message`` after ``where`` and a colon when ``where`` is given: what was given the option (the
    callback the user built, the file it came from), as every option message names it."""
    return f"{where}: {message}" if where else message


def some_of(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names`` and how many more there are, for a message: ``"a, b, c and 4 more"``."""
    return ", ".join(names[:shown]) + and_more(len(names), shown)


def and_more(count: int, shown: int = 3) -> str:
    """``" and 4 more"`` when a message names ``shown`` of ``count`` things, else nothing."""
    return f" and {count - shown} more" if count > shown else ""


def check_number(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    whole: bool = False,
    infinite_ok: bool = False,
    hint: str = "",
    where: str = "",
) -> float:
    """``value`` if it is a number in range, else a :class:`LoraMonitorError` naming ``name`` (after
    ``where``, the callback or file that was given it, when there is one) and ``value``.

    The one validator of numeric options (thresholds, fractions, ranks): ``low``/``high`` bounds (``low``
    excluded with ``low_open``), whole numbers only with ``whole``, ``inf`` only with ``infinite_ok``.
    ``hint`` is appended to the message (``"0.95 = keep 95%"``).
    """
    name = named(name, where)
    hint = f" ({hint})" if hint else ""
    # bool is an int subclass, but True is no number here.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if whole and not (
        is_number and (isinstance(value, int) or (math.isfinite(value) and value == int(value)))
    ):
        raise LoraMonitorError(f"{name} must be a whole number, got {value!r}{hint}")
    if not is_number:
        raise LoraMonitorError(f"{name} must be a number, got {value!r}{hint}")
    if math.isnan(value) or (math.isinf(value) and not infinite_ok):
        raise LoraMonitorError(f"{name} must be a finite number, got {value!r}{hint}")
    if (value <= low if low_open else value < low) or value > high:
        lowest = f"above {low:g}" if low_open else f"at least {low:g}"
        highest = "" if math.isinf(high) else f" and at most {high:g}"
        raise LoraMonitorError(f"{name} must be {lowest}{highest}, got {value!r}{hint}")
    return value


def check_choice(
    value: Any, choices: Sequence[Choice], option: str, where: str = "", hint: str = ""
) -> Choice:
    """``value`` if it is one of ``choices``, else a :class:`LoraMonitorError` naming ``option`` (after
    ``where``, the callback or file that was given it, when there is one) and the choices, ``hint`` appended.

    The one validator of choice options (a mode, a schedule, a fit rule): the API and the command refuse the
    same value with the same message.
    """
    if value not in choices:
        hint = f" ({hint})" if hint else ""
        raise LoraMonitorError(named(f"{option} must be one of {tuple(choices)}, got {value!r}{hint}", where))
    return value


def check_path(path: str | os.PathLike, what: str, *, folder: bool, hint: str = "") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is the folder (``folder=True``) or the file it should be,
    else a :class:`LoraMonitorError` naming it: ``PATH: no such WHAT``, or what is there instead (with
    ``hint``, what the input should be, appended).

    The one check of an input path. It imports nothing: the command runs it on the paths it was given
    before importing torch and PEFT (a second or more), so a mistyped path is answered at once.
    """
    found = Path(path)
    hint = f"; {hint}" if hint else ""
    if not found.exists():
        raise LoraMonitorError(f"{found}: no such {what}")
    article = "an" if what[:1] in "aeiou" else "a"
    if folder and not found.is_dir():
        raise LoraMonitorError(f"{found}: is a file, not {article} {what}{hint}")
    if not folder and found.is_dir():
        raise LoraMonitorError(f"{found}: is a folder, not {article} {what}{hint}")
    return found


def check_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` when this machine has it (None stays None), else a
    :class:`LoraMonitorError` naming it: a name torch does not know, or a device torch was not built for or
    cannot reach here (``"cuda"`` on a CPU-only build, ``"cuda:3"`` on a machine with one GPU)."""
    if device is None:
        return None
    import torch  # only here: the other checks of this module answer before torch is imported

    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)  # what reaching the device takes; raises where it is not here
    except Exception as error:  # torch raises RuntimeError, AssertionError, TypeError... by device kind
        reason = " ".join(str(error).split()) or type(error).__name__
        raise LoraMonitorError(f"device {device!r} is not available here ({reason})") from error
    return resolved
