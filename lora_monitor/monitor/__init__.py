"""Adapter health: per-module spectral metrics, their history and trends, and alerts."""

from .alerts import Alert, AlertMonitor, AlertThresholds, Severity, check_alerts
from .metrics import (
    AdapterSummary,
    BaseNormCache,
    MetricsHistory,
    ModuleMetrics,
    compute_module_metrics,
    dynamics_scalars,
    gradient_effective_ranks,
    summarize,
)

__all__ = [
    "AdapterSummary",
    "Alert",
    "AlertMonitor",
    "AlertThresholds",
    "BaseNormCache",
    "MetricsHistory",
    "ModuleMetrics",
    "Severity",
    "check_alerts",
    "compute_module_metrics",
    "dynamics_scalars",
    "gradient_effective_ranks",
    "summarize",
]
