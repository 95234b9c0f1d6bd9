"""The ``lora-monitor`` command: one module per sub-command (``analyze``, ``squeeze``, ``allocate``, ``edit``,
``report``, ``demo``), what they share in :mod:`.arguments`, the parser and :func:`main` in :mod:`.parser`.

Each sub-command is a ``register_*`` function that adds its parser and sets ``handler``; the handler gets
the parsed arguments and returns the exit status. A :class:`LoraMonitorError` (bad input) is printed as one
line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

from .arguments import EXIT_BAD_INPUT
from .parser import build_parser, main

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]
