"""Adapter health: per-module spectral metrics, their summary, history and trends, alerts, and the check
that runs them all (:class:`Monitor`)."""

from .alerts import Alert, AlertMonitor, AlertThresholds, Severity, check_alerts
from .check import Monitor, MonitorRecord
from .gradients import gradient_effective_ranks
from .history import MetricsHistory, ModuleDynamics, dynamics_scalars
from .metrics import BaseNormCache, ModuleMetrics, compute_module_metrics
from .summary import AdapterSummary, summarize

__all__ = [
    "AdapterSummary",
    "Alert",
    "AlertMonitor",
    "AlertThresholds",
    "BaseNormCache",
    "MetricsHistory",
    "ModuleDynamics",
    "ModuleMetrics",
    "Monitor",
    "MonitorRecord",
    "Severity",
    "check_alerts",
    "compute_module_metrics",
    "dynamics_scalars",
    "gradient_effective_ranks",
    "summarize",
]
