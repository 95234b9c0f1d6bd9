"""PostSqueezeCallback: when training ends, the variance table of the final adapter and, optionally, its
compressed copy. The analysis itself is :func:`lora_monitor.squeeze.analyze_adapter`; this is the glue.

    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[PostSqueezeCallback(min_variance_retention=0.95, compress=True)])
    trainer.train()          # prints the table, writes squeeze_manifest.json (and output_dir/squeezed)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lora_monitor.adapters import find_lora_modules
from lora_monitor.errors import LoraMonitorError
from lora_monitor.render.report import write_report
from lora_monitor.squeeze import (
    CompressionResult,
    SqueezeAnalysis,
    analyze_adapter,
    compress_adapter,
    print_analysis,
    validate_rank,
    validate_threshold,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SQUEEZE_MANIFEST_NAME = "squeeze_manifest.json"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel, DeepSpeed engines
    return getattr(model, "_orig_mod", model)  # torch.compile


class PostSqueezeCallback(TrainerCallback):
    """Analyse the final LoRA adapter when training ends (main process only); optionally compress it.

    On ``on_train_end`` it prints the variance table, writes the analysis to ``squeeze_manifest.json`` in
    ``args.output_dir`` (or as a ``"squeeze"`` entry of an existing ``manifest.json``), logs a W&B table
    and the ``squeeze/*`` summary keys when the run reports to W&B, and with ``compress=True`` writes the
    adapter compressed to the recommended rank (or one rank per module with ``per_module=True``) to
    ``output_dir/<output_subdir>``. The result is kept as ``callback.analysis`` (and
    ``callback.compression``). With ``report=True`` it also draws the run's plots and ``report.html`` into
    ``output_dir`` (list it after a SpectralMonitorCallback so the monitor's last check is drawn too).
    A failed analysis (e.g. NaN weights) is logged and kept as
    ``callback.error``; it never takes the trained model down with it.
    """

    def __init__(
        self,
        min_variance_retention: float = 0.95,
        compress: bool = False,
        target_ranks: Sequence[int] | None = None,
        output_subdir: str = "squeezed",
        *,
        per_module: bool = False,
        adapter_name: str | None = None,
        print_table: bool = True,
        report: bool = False,
    ) -> None:
        self.min_variance_retention = validate_threshold(min_variance_retention)
        self.target_ranks = (
            None if target_ranks is None else [validate_rank(k, "every target rank") for k in target_ranks]
        )
        if not output_subdir or Path(output_subdir).is_absolute() or ".." in Path(output_subdir).parts:
            raise LoraMonitorError(
                f"output_subdir must be a folder name inside output_dir, got {output_subdir!r}"
            )
        self.compress = compress
        self.output_subdir = output_subdir
        self.per_module = per_module
        self.adapter_name = adapter_name
        self.print_table = print_table
        self.report = report
        self.report_path: Path | None = None
        self.analysis: SqueezeAnalysis | None = None
        self.compression: CompressionResult | None = None
        self.error: str | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        # Fail before training, not after it, when there is nothing to squeeze.
        if model is not None:
            find_lora_modules(_unwrap(model), self.adapter_name)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or model is None:
            return
        model = _unwrap(model)
        output_dir = Path(args.output_dir)
        try:
            self.analysis = analyze_adapter(
                model,
                min_variance_retention=self.min_variance_retention,
                target_ranks=self.target_ranks,
                adapter_name=self.adapter_name,
            )
            if self.print_table:
                print_analysis(self.analysis)
            if self.compress:
                self.compression = self._compress(model, output_dir)
            self._write_manifest(output_dir)
            self._log_to_wandb(args)
            if self.report:
                self.report_path = write_report(output_dir)
        except LoraMonitorError as error:
            self.error = str(error)
            logger.warning("PostSqueezeCallback: no squeeze analysis: %s", error)
        except Exception as error:  # never take the trained model (and the user's save after train()) down
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("PostSqueezeCallback failed after training; the trained adapter is unaffected")

    def _compress(self, model: torch.nn.Module, output_dir: Path) -> CompressionResult | None:
        assert self.analysis is not None
        if not self.per_module and self.analysis.recommended_rank is None:
            logger.warning("PostSqueezeCallback: every LoRA delta is zero; nothing compressed")
            return None
        return compress_adapter(
            model,
            output_dir / self.output_subdir,
            target_rank=None if self.per_module else self.analysis.recommended_rank,
            min_variance_retention=self.min_variance_retention,
            per_module=self.per_module,
            adapter_name=self.adapter_name,
            overwrite=True,  # a re-run into the same output_dir replaces its own squeezed copy
        )

    def manifest_entry(self) -> dict[str, Any]:
        """What goes into the manifest: the analysis and, when one was written, the compressed adapter."""
        assert self.analysis is not None
        entry = self.analysis.to_dict()
        entry["compressed"] = self.compression.to_dict() if self.compression is not None else None
        return entry

    def _write_manifest(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest = output_dir / MANIFEST_NAME
        if manifest.is_file():
            try:
                document = json.loads(manifest.read_text())
            except json.JSONDecodeError as error:
                logger.warning("PostSqueezeCallback: %s is not valid JSON (%s); left alone", manifest, error)
                document = None
            if isinstance(document, dict):
                document["squeeze"] = self.manifest_entry()
                _write_json(manifest, document)
                return
        _write_json(output_dir / SQUEEZE_MANIFEST_NAME, self.manifest_entry())

    def _log_to_wandb(self, args: TrainingArguments) -> None:
        if "wandb" not in (args.report_to or []):
            return
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None or self.analysis is None:
            return
        columns = [
            "rank",
            "mean_variance",
            "min_variance",
            "max_variance",
            "weighted_variance",
            "recommended",
        ]
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in self.analysis.rows()])
        wandb.run.log({"squeeze/variance_table": table})
        summary = {
            "squeeze/source_rank": self.analysis.source_rank,
            "squeeze/num_layers": self.analysis.num_layers,
            "squeeze/min_variance_retention": self.analysis.min_variance_retention,
        }
        if self.analysis.recommended_rank is not None:
            summary["squeeze/recommended_rank"] = self.analysis.recommended_rank
            summary["squeeze/recommended_rank_weighted"] = self.analysis.recommended_rank_weighted
        wandb.run.summary.update(summary)


def _write_json(path: Path, document: Any) -> None:
    # Written beside the target and renamed over it, so a crash never leaves half a manifest.
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(staging, path)
