"""PostSqueezeCallback: when training ends, the variance table of the final adapter and, optionally, its
compressed copy. The analysis itself is :func:`lora_monitor.post_squeeze.analyze_adapter`; this is the glue.

    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[PostSqueezeCallback(min_variance_retention=0.95, compress=True)])
    trainer.train()          # prints the table, writes squeeze_manifest.json (and output_dir/squeezed)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerControl, TrainingArguments

from lora_monitor._deprecation import renamed_keywords
from lora_monitor.errors import LoraMonitorError
from lora_monitor.monitor.intruders import IntruderDimensions
from lora_monitor.post_squeeze import CompressionResult, SqueezeAnalysis, SqueezeOptions, gather_adapter
from lora_monitor.post_squeeze.end_of_training import (
    EndOfTraining,
    check_by_function,
    check_candidate_ranks,
    function_is_measured,
    held_out_batches,
    held_out_labels,
    squeeze_trained_adapter,
)
from lora_monitor.post_squeeze.held_out import DEFAULT_LOSS_RETENTION, FunctionRecommendation
from lora_monitor.post_squeeze.options import checked_eval_batches, validate_threshold, validate_tolerance
from lora_monitor.render.console import print_rank_advice
from lora_monitor.render.report import write_report

from ._base import TrainerBoundCallback

logger = logging.getLogger(__name__)


class PostSqueezeCallback(TrainerBoundCallback):
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

    By function (``by_function="auto"``, the default, whenever there is held-out data: ``eval_batches``, or
    the Trainer's eval dataloader (the one it last evaluated on, else one built from its ``eval_dataset``);
    ``True`` requires it) every candidate rank is also tried in place on the
    trained model, one pass per rank (:func:`~lora_monitor.post_squeeze.held_out.recommend_rank_by_function`); the
    smallest rank that keeps 95% of the held-out loss reduction the directions beyond the first bring (or, when
    a relative ``tolerance`` such as 0.01 is given, whose loss rises less than that) is printed beside the energy advice (per
    type with ``by_module_type``), kept as ``callback.function``, written to the manifest and used by
    ``compress``. Without held-out data (or under FSDP2, or ``by_function=False``) the energy rank is
    printed as what it is, an upper bound; the manifest's ``recommendation_basis`` says which one it is.

    Its options are checked when it is built; what needs the Trainer (the adapter, ``candidate_ranks`` against
    its rank, held-out data for ``by_function``) at ``on_train_begin``, before the first step: either stops
    with a :class:`~lora_monitor.errors.LoraMonitorError`, never after a whole run.
    """

    @renamed_keywords(target_ranks="candidate_ranks")  # the old name, for a release
    def __init__(
        self,
        min_variance_retention: float = 0.95,
        compress: bool = False,
        candidate_ranks: Sequence[int] | None = None,
        output_subdir: str = "squeezed",
        *,
        per_module: bool = False,
        adapter_name: str | None = None,
        print_table: bool = True,
        report: bool = False,
        intruders: bool = True,
        by_function: bool | str = "auto",
        tolerance: float | None = None,
        min_loss_retention: float = DEFAULT_LOSS_RETENTION,
        eval_batches: Iterable[dict[str, Any]] | None = None,
        by_module_type: bool = False,
    ) -> None:
        self.options = SqueezeOptions(
            min_variance_retention=min_variance_retention,
            candidate_ranks=candidate_ranks,
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
        self.by_function = check_by_function(by_function, "PostSqueezeCallback")
        self.by_module_type = by_module_type
        # Whether the rank by function is measured: decided at on_train_begin (function_is_measured).
        self._measure_function = by_function is True
        self.tolerance = validate_tolerance(tolerance, "PostSqueezeCallback: tolerance")
        self.min_loss_retention = validate_threshold(
            min_loss_retention, "PostSqueezeCallback: min_loss_retention"
        )
        self.eval_batches = None if eval_batches is None else checked_eval_batches(eval_batches)
        self.function: FunctionRecommendation | None = None
        self._done_at = None
        self.report_path: Path | None = None
        self.analysis: SqueezeAnalysis | None = None
        self.compression: CompressionResult | None = None
        self.error: str | None = None

    def on_train_begin(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if model is not None:  # fail before training, not after it, when there is nothing to squeeze
            check_candidate_ranks(model, self.options, self.adapter_name)
        has_data = (
            self.eval_batches is not None
            or eval_dataloader is not None
            or getattr(self._trainer, "eval_dataset", None) is not None
        )
        self._measure_function = function_is_measured(
            self.by_function, has_data, model, self.adapter_name, "PostSqueezeCallback"
        )
        if self._measure_function and self.eval_batches is None:  # eval_batches were checked when given
            self._measure_function, warning = held_out_labels(
                self.by_function, self._held_out_loader(eval_dataloader), "PostSqueezeCallback"
            )
            if warning:
                logger.warning(warning)

    def on_step_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        # At the last step, so that the summary reaches every report_to integration before they close.
        if self._is_last_step(state, control):
            return self._finish(args, state, control, model, eval_dataloader)
        return None

    def on_train_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self._done_at != state.global_step:  # a run that ended before max_steps some other way
            self._finish(args, state, control, model, eval_dataloader)

    def _finish(self, args, state, control, model, eval_dataloader=None) -> TrainerControl | None:
        self._done_at = state.global_step
        if model is None:
            return None
        output_dir = Path(args.output_dir)
        try:  # under FSDP2 every process joins the gather of the whole adapter; the main one goes on
            model = gather_adapter(model, self.adapter_name)
            if not state.is_world_process_zero:
                return None
            result = squeeze_trained_adapter(
                model,
                output_dir,
                self.options,
                adapter_name=self.adapter_name,
                compress_to=self.output_subdir if self.compress else None,
                eval_batches=held_out_batches(
                    self.eval_batches, lambda: self._held_out_loader(eval_dataloader)
                )
                if self._measure_function
                else None,
                tolerance=self.tolerance,
                min_loss_retention=self.min_loss_retention,
                by_module_type=self.by_module_type,
                function_required=self.by_function is True,
                intruders=self.intruders,
            )
            if self.print_table:  # the feature returns data; the binding prints it
                print_rank_advice(result.analysis, result.function)
            self.analysis, self.function = result.analysis, result.function
            self.compression, self.intruder_dimensions = result.compression, result.intruders
            for warning in result.warnings:  # what failed without stopping it; the analysis is kept
                self.error = warning
                logger.warning("PostSqueezeCallback: %s", warning)
            result.write_manifest(output_dir)
            self._log_to_wandb(args, result)
            if self.report:
                self.report_path = write_report(output_dir)
            return self.emit_log(args, state, control, result.scalars())
        except LoraMonitorError as error:  # NaN weights, an unwritable output_dir...: logged, never raised
            self.error = str(error)
            logger.warning("PostSqueezeCallback: %s", error)
        except Exception as error:  # never take the trained model (and the user's save after train()) down
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("PostSqueezeCallback failed after training; the trained adapter is unaffected")
        return None

    def _log_to_wandb(self, args: TrainingArguments, result: EndOfTraining) -> None:
        wandb = self._active_wandb(args)
        if wandb is not None:
            self._log_table_to_wandb(
                wandb, "squeeze/variance_table", *result.variance_table(), result.run_summary()
            )
