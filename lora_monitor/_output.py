"""What lora-monitor lets through to the terminal: third-party noise off, and the command's -q/-v levels.

Some libraries we import talk at import or on every call with messages that say nothing a lora-monitor user
can act on. Each is silenced here, one message at a time, so that everything else they say still shows:

- bitsandbytes (imported by PEFT wherever it is installed) logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" at import on CPUs with AVX-512 BF16 when the optional ``kernels`` package is missing: a
  fallback for a 4-bit CPU kernel nothing here runs. A filter on that one logger drops that one message
  (:func:`silence_import_noise`, run when ``lora_monitor`` is imported: before PEFT is, in any import order
  that starts with ``lora_monitor``).
- PEFT asks every model ``is_gradient_checkpointing``, which newer transformers answer with a
  FutureWarning addressed to PEFT's authors; :func:`quiet_third_party` ignores that warning (and only it)
  inside lora-monitor's own runs (the demo, the command).
- transformers draws a progress bar for every model it loads or saves ("Loading weights"), a bar for a
  tenth of a second on the models here: off in the command unless ``--verbose`` (:func:`verbosity_of_command`)
  and in the demo unless verbose (:func:`transformers_progress_bars`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSITIES = ("quiet", "normal", "verbose")

_BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BITSANDBYTES_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_import_noise() -> None:
    """Drop the bitsandbytes kernel message (see the module docstring); calling it again adds nothing."""
    logger = logging.getLogger(_BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BITSANDBYTES_KERNEL_MESSAGE))


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside: the third-party warnings listed in the module docstring are not shown; every other one is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning)
        yield


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Inside: transformers' progress bars on or off (it imports transformers); as they were afterwards."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def verbosity_of_command(verbosity: str) -> Iterator[None]:
    """Inside: the command's output level, ``"quiet"`` (results and errors only), ``"normal"`` (warnings
    too) or ``"verbose"`` (lora-monitor's info and debug messages and every progress bar as well); the
    process's logging, warnings and environment are as they were afterwards (the command may run in-process).

    Entered before torch and transformers are imported: transformers reads its level and whether to draw
    its progress bars from the environment, once.
    """
    logger = logging.getLogger("lora_monitor")
    level, handlers = logger.level, list(logger.handlers)
    environment = {
        name: os.environ.get(name) for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    }
    imported_before = {name for name in ("transformers",) if name in sys.modules}
    with warnings.catch_warnings():
        if verbosity != "verbose":
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if verbosity == "quiet":
            logger.setLevel(logging.ERROR)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            warnings.simplefilter("ignore")
        elif verbosity == "verbose":
            logger.setLevel(logging.DEBUG)
            if not handlers:
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("lora-monitor: %(levelname)s: %(message)s"))
                logger.addHandler(handler)
        # "normal": Python's defaults (warnings and errors on stderr), with the noise above silenced.
        try:
            yield
        finally:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            for name, value in environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _unset_what_a_first_import_read(imported_before, environment)


def _unset_what_a_first_import_read(imported_before: set[str], environment: dict[str, str | None]) -> None:
    """transformers reads TRANSFORMERS_VERBOSITY once, when first imported: first imported inside the command,
    it would stay at the command's level for the rest of the process (a notebook, a test). Give it back its own
    default where the process had not set the variable itself. (huggingface_hub's progress-bar variable
    cannot be undone that way: a process whose first import of transformers is inside a quiet in-process
    ``main()`` keeps its progress bars off.)"""
    if (
        "transformers" not in imported_before
        and "transformers" in sys.modules
        and environment["TRANSFORMERS_VERBOSITY"] is None
    ):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(transformers_logging.WARNING)  # transformers' own default


def progress_bars(verbosity: str) -> bool | None:
    """The ``progress`` argument for a verbosity: off when quiet, on when verbose, else on a terminal only."""
    return {"quiet": False, "verbose": True}.get(verbosity)
