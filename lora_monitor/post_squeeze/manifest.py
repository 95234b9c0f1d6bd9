"""The Post-Squeeze entry of a run's manifest: what the analysis found and what was compressed.

Written into ``manifest.json`` (as its ``"squeeze"`` entry) when the run already has one, else as
``squeeze_manifest.json``; :func:`lora_monitor.render.report.write_report` reads either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import MANIFEST_NAME, SQUEEZE_MANIFEST_NAME, atomic_write_json
from ..monitor.intruders import IntruderDimensions
from .analysis import SqueezeAnalysis
from .compress import CompressionResult

logger = logging.getLogger(__name__)


def manifest_entry(
    analysis: SqueezeAnalysis,
    compression: CompressionResult | None = None,
    intruders: Sequence[IntruderDimensions] | None = None,
) -> dict[str, Any]:
    """The analysis as JSON types, with ``"compressed"`` (the compressed adapter's record, or None) and
    ``"intruders"`` (each module's intruder dimensions against its base weight, or None)."""
    entry = analysis.to_dict()
    entry["compressed"] = compression.to_dict() if compression is not None else None
    entry["intruders"] = [record.to_dict() for record in intruders] if intruders is not None else None
    return entry


def write_squeeze_manifest(output_dir: Path, entry: dict[str, Any]) -> Path:
    """Write ``entry`` as the ``"squeeze"`` entry of ``output_dir/manifest.json`` when that file holds a
    JSON object, else as ``output_dir/squeeze_manifest.json``; returns the file written. Atomic: a crash
    never leaves half a manifest. A :class:`~lora_monitor.errors.LoraMonitorError` names an unwritable path.
    """
    manifest = Path(output_dir) / MANIFEST_NAME
    if manifest.is_file():
        try:
            document = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            logger.warning(
                "%s is not valid JSON (%s); left alone, writing %s", manifest, error, SQUEEZE_MANIFEST_NAME
            )
            document = None
        if isinstance(document, dict):
            document["squeeze"] = entry
            return atomic_write_json(manifest, document)
    return atomic_write_json(Path(output_dir) / SQUEEZE_MANIFEST_NAME, entry)


TABLE_COLUMNS = ("rank", "mean_variance", "min_variance", "max_variance", "weighted_variance", "recommended")


def table_rows(analysis: SqueezeAnalysis) -> list[list[Any]]:
    """The variance table as rows of :data:`TABLE_COLUMNS` (what a W&B table or a CSV takes)."""
    return [[row[column] for column in TABLE_COLUMNS] for row in analysis.rows()]


def summary_scalars(
    analysis: SqueezeAnalysis, intruders: Sequence[IntruderDimensions] | None = None
) -> dict[str, float]:
    """The ``squeeze/*`` run-summary keys: source rank, modules analysed, threshold, recommended ranks, and
    with ``intruders`` the total of intruder dimensions and the modules that have any."""
    summary: dict[str, float] = {
        "squeeze/source_rank": analysis.source_rank,
        "squeeze/num_modules": analysis.num_modules,
        "squeeze/min_variance_retention": analysis.min_variance_retention,
    }
    if analysis.recommended_rank is not None:
        summary["squeeze/recommended_rank"] = analysis.recommended_rank
    if analysis.recommended_rank_weighted is not None:
        summary["squeeze/recommended_rank_weighted"] = analysis.recommended_rank_weighted
    if intruders is not None:
        summary["squeeze/intruder_dimensions"] = sum(record.count for record in intruders)
        summary["squeeze/modules_with_intruders"] = sum(record.count > 0 for record in intruders)
    return summary
