"""Pictures and tables: the run report (PNG plots + one HTML page)."""

from .report import write_report

__all__ = ["write_report"]
