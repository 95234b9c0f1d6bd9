"""PostSqueezeCallback: when training ends, the variance table of the final adapter and, optionally, its
compressed copy. The analysis itself is :func:`lora_monitor.squeeze.analyze_adapter`; this is the glue.

    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[PostSqueezeCallback(min_variance_retention=0.95, compress=True)])
    trainer.train()          # prints the table, writes squeeze_manifest.json (and output_dir/squeezed)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainingArguments

from lora_monitor.adapters import find_lora_modules, unwrap_model
from lora_monitor.errors import LoraMonitorError
from lora_monitor.monitor.intruders import IntruderDimensions, intruder_dimensions
from lora_monitor.render.console import print_function_recommendation
from lora_monitor.render.report import write_report
from lora_monitor.squeeze import (
    CompressionResult,
    SqueezeAnalysis,
    SqueezeOptions,
    analyze_adapter,
    compress_adapter,
    gather_adapter,
    manifest_entry,
    print_analysis,
    write_squeeze_manifest,
)
from lora_monitor.squeeze.function import (
    DEFAULT_TOLERANCE,
    FunctionRecommendation,
    recommend_rank_by_function,
)
from lora_monitor.squeeze.manifest import TABLE_COLUMNS, summary_scalars, table_rows

from ._trainer_glue import (
    active_wandb,
    emit_log,
    find_calling_handler,
    find_calling_trainer,
    is_last_step,
)

logger = logging.getLogger(__name__)


class PostSqueezeCallback(TrainerCallback):
    """Analyse the final LoRA adapter when training ends (main process only); optionally compress it.

    At the last step (or ``on_train_end`` when a run stops otherwise) it prints the variance table, writes the analysis to ``squeeze_manifest.json`` in
    ``args.output_dir`` (or as a ``"squeeze"`` entry of an existing ``manifest.json``), logs a W&B table
    and the ``squeeze/*`` summary keys when the run reports to W&B, and with ``compress=True`` writes the
    adapter compressed to the recommended rank (or one rank per module with ``per_module=True``) to
    ``output_dir/<output_subdir>``. The result is kept as ``callback.analysis`` (and
    ``callback.compression``). With ``report=True`` it also draws the run's plots and ``report.html`` into
    ``output_dir`` (list it after a SpectralMonitorCallback so the monitor's last check is drawn too).
    With ``intruders=True`` (the default) it counts each module's intruder dimensions against its base
    weight (:mod:`lora_monitor.monitor.intruders`; about a second per 4096-wide module on a CPU, once).
    The ``squeeze/*`` summary reaches every ``report_to`` integration as a log event at that step.

    With ``by_function=True`` the rank is also chosen by what it does to held-out loss
    (:func:`~lora_monitor.squeeze.function.recommend_rank_by_function`): every candidate rank is tried in
    place on the trained model over ``eval_batches``, or the Trainer's ``eval_dataset`` when none are given,
    and the smallest whose loss is within ``tolerance`` (relative) of the full adapter's is recommended,
    printed beside the energy advice (per module type too with ``by_module_type=True``), kept as
    ``callback.function``, written to the manifest and, with ``compress=True``, used for the compressed
    copy. Cost: one pass over the evaluation set per candidate rank (and per module type), with a progress
    bar. Not under FSDP2.
    A failed analysis or write (NaN weights, a full disk) is logged and kept as ``callback.error``; it never
    takes the trained model down with it.
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
        intruders: bool = True,
        by_function: bool = False,
        tolerance: float = DEFAULT_TOLERANCE,
        eval_batches: Iterable[dict[str, Any]] | None = None,
        by_module_type: bool = False,
    ) -> None:
        self.options = SqueezeOptions(
            min_variance_retention=min_variance_retention,
            target_ranks=target_ranks,
            per_module=per_module,
            where="PostSqueezeCallback",
        )
        if not output_subdir or Path(output_subdir).is_absolute() or ".." in Path(output_subdir).parts:
            raise LoraMonitorError(
                f"output_subdir must be a folder name inside output_dir, got {output_subdir!r}"
            )
        self.compress = compress
        self.output_subdir = output_subdir
        self.adapter_name = adapter_name
        self.print_table = print_table
        self.report = report
        self.intruders = intruders
        self.intruder_dimensions: list[IntruderDimensions] | None = None
        self.by_function, self.tolerance, self.by_module_type = by_function, tolerance, by_module_type
        self.eval_batches = None if eval_batches is None else list(eval_batches)
        self.function: FunctionRecommendation | None = None
        self._trainer = None
        self._handler, self._done_at = None, None
        self.report_path: Path | None = None
        self.analysis: SqueezeAnalysis | None = None
        self.compression: CompressionResult | None = None
        self.error: str | None = None

    def attach(self, trainer: Any) -> PostSqueezeCallback:
        """Bind to ``trainer`` (adding this callback to it if needed); returns ``self``."""
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._trainer, self._handler = trainer, trainer.callback_handler
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # fail before training, not after it, when there is nothing to squeeze
            find_lora_modules(unwrap_model(model), self.adapter_name)
        self._trainer = find_calling_trainer(self) or self._trainer
        no_data = self.eval_batches is None and getattr(self._trainer, "eval_dataset", None) is None
        if self.by_function and no_data:
            raise LoraMonitorError(
                "PostSqueezeCallback(by_function=True) needs held-out data: give the Trainer an "
                "eval_dataset, or pass eval_batches"
            )

    def on_init_end(self, args, state, control, **kwargs):
        self._handler = find_calling_handler(self)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # At the last step, so that the summary reaches every report_to integration before they close.
        return self._finish(args, state, control, model) if is_last_step(state, control) else None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._done_at != state.global_step:  # a run that ended before max_steps some other way
            self._finish(args, state, control, model)

    def _finish(self, args, state, control, model) -> TrainerControl | None:
        self._done_at = state.global_step
        if model is None:
            return None
        output_dir = Path(args.output_dir)
        try:  # under FSDP2 every process joins the gather of the whole adapter; the main one goes on
            model = gather_adapter(model, self.adapter_name)
            if not state.is_world_process_zero:
                return None
            self.analysis = analyze_adapter(
                model,
                min_variance_retention=self.options.min_variance_retention,
                target_ranks=self.options.target_ranks,
                adapter_name=self.adapter_name,
            )
            if self.print_table:
                print_analysis(self.analysis)
            if self.by_function and isinstance(model, torch.nn.Module):  # not on an FSDP2 snapshot
                self.function = self._recommend_by_function(model)
                if self.print_table:
                    print_function_recommendation(self.function)
            if self.compress:
                self.compression = self._compress(model, output_dir)
            if self.intruders and isinstance(model, torch.nn.Module):  # not on a gathered FSDP2 snapshot
                modules = find_lora_modules(model, self.adapter_name)
                self.intruder_dimensions = intruder_dimensions(modules, lambda module: module.base_weight())
            entry = manifest_entry(self.analysis, self.compression, self.intruder_dimensions)
            if self.function is not None:
                entry["function"] = self.function.to_dict()
            write_squeeze_manifest(output_dir, entry)
            self._log_to_wandb(args)
            if self.report:
                self.report_path = write_report(output_dir)
            scalars = summary_scalars(self.analysis, self.intruder_dimensions)
            if self.function is not None:
                scalars["squeeze/function_recommended_rank"] = self.function.recommended_rank
            return emit_log(self._handler, args, state, control, scalars)
        except LoraMonitorError as error:  # NaN weights, an unwritable output_dir...: logged, never raised
            self.error = str(error)
            logger.warning("PostSqueezeCallback: %s", error)
        except Exception as error:  # never take the trained model (and the user's save after train()) down
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("PostSqueezeCallback failed after training; the trained adapter is unaffected")
        return None

    def _recommend_by_function(self, model: torch.nn.Module) -> FunctionRecommendation:
        batches = self.eval_batches
        if batches is None:
            batches = list(self._trainer.get_eval_dataloader())
        return recommend_rank_by_function(
            model,
            batches,
            ranks=self.options.target_ranks,
            tolerance=self.tolerance,
            adapter_name=self.adapter_name,
            energy_threshold=self.options.min_variance_retention,
            by_module_type=self.by_module_type,
        )

    def _compress(self, model: Any, output_dir: Path) -> CompressionResult | None:
        # At the function's rank when it was measured, else the energy's (or per module); no recommendation
        # is an error naming the closest rank.
        by_function = self.function is not None and not self.options.per_module
        try:
            return compress_adapter(
                model,
                output_dir / self.output_subdir,
                min_variance_retention=self.options.min_variance_retention,
                per_module=self.options.per_module,
                target_rank=self.function.recommended_rank if by_function else None,
                target_ranks=self.options.target_ranks,
                adapter_name=self.adapter_name,
                overwrite=True,  # a re-run into the same output_dir replaces its own squeezed copy
            )
        except LoraMonitorError as error:  # the analysis is still written to the manifest
            self.error = f"nothing compressed: {error}"
            logger.warning("PostSqueezeCallback: %s", self.error)
            return None

    def _log_to_wandb(self, args: TrainingArguments) -> None:
        wandb = active_wandb(args)
        if wandb is not None and self.analysis is not None:
            table = wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(self.analysis))
            wandb.run.log({"squeeze/variance_table": table})
            wandb.run.summary.update(summary_scalars(self.analysis, self.intruder_dimensions))
