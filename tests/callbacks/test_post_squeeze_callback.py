"""PostSqueezeCallback with a real Trainer: table, manifest, compressed adapter, W&B offline summary."""

from __future__ import annotations

import json

import pytest
import torch
from dense_reference import lora_layers
from offline_wandb import offline_wandb_summary, run_with_offline_wandb
from peft import PeftModel
from tiny_models import peft_llama, tiny_llama, training_args
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

from lora_monitor.callbacks.monitor import SpectralMonitorCallback
from lora_monitor.callbacks.post_squeeze import PostSqueezeCallback
from lora_monitor.errors import LoraMonitorError
from lora_monitor.post_squeeze import analyze_adapter


def train(tmp_path, lm_dataset, callback, steps=4, **overrides):
    model = peft_llama(0, init_lora_weights=True, r=8)
    args = training_args(tmp_path / "run", max_steps=steps, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[callback])
    trainer.train()
    return model, args


def test_analysis_table_and_manifest(tmp_path, lm_dataset, capsys):
    callback = PostSqueezeCallback(min_variance_retention=0.9)
    model, _ = train(tmp_path, lm_dataset, callback)
    assert callback.analysis is not None and callback.error is None
    # the same numbers as analysing the trained adapter directly
    direct = analyze_adapter(model, min_variance_retention=0.9)
    assert callback.analysis.recommended_rank == direct.recommended_rank is not None
    assert callback.analysis.mean_variance == pytest.approx(direct.mean_variance)
    assert callback.analysis.num_modules == 14  # every module trained away from B = 0
    # No held-out data: the default (by_function="auto") falls back to energy, said to be an upper bound.
    assert callback.function is None
    out = capsys.readouterr().out
    assert "<--" in out and f"Energy rank: {direct.recommended_rank} " in out
    assert "an upper bound, not a checked rank, in four of the five settings" in out and "8×" in out
    manifest = json.loads((tmp_path / "run" / "squeeze_manifest.json").read_text())
    assert manifest["recommendation_basis"] == "energy (upper bound)"
    assert manifest["recommended_rank"] == direct.recommended_rank
    assert manifest["source_rank"] == 8
    assert manifest["compressed"] is None
    assert not (tmp_path / "run" / "squeezed").exists()


@pytest.mark.slow
def test_existing_manifest_gets_a_squeeze_entry_and_compressed_adapter(tmp_path, lm_dataset):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"runs": ["a"]}))
    callback = PostSqueezeCallback(min_variance_retention=0.8, compress=True, candidate_ranks=[1, 2, 4, 8])
    model, _ = train(tmp_path, lm_dataset, callback)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["runs"] == ["a"]
    rank = manifest["squeeze"]["recommended_rank"]
    assert rank == callback.analysis.recommended_rank
    assert manifest["squeeze"]["compressed"]["output_path"].endswith("squeezed")
    assert not (tmp_path / "run" / "squeeze_manifest.json").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "run" / "squeezed")
    for name, layer in lora_layers(reloaded).items():
        assert layer.r["default"] == min(rank, 8), name
        assert layer.scaling["default"] == pytest.approx(lora_layers(model)[name].scaling["default"])


@pytest.mark.slow
def test_wandb_offline_summary(tmp_path, lm_dataset, monkeypatch):
    callback = PostSqueezeCallback(min_variance_retention=0.9)
    run_folder = run_with_offline_wandb(
        monkeypatch, tmp_path, lambda: train(tmp_path, lm_dataset, callback, steps=2, report_to=["wandb"])
    )
    runs = [run_folder]
    assert run_folder.name.startswith("offline-run-")
    summary = offline_wandb_summary(runs[0])
    assert summary["squeeze/recommended_rank"] == callback.analysis.recommended_rank
    assert summary["squeeze/source_rank"] == 8
    assert summary["squeeze/num_modules"] == 14
    assert summary["squeeze/min_variance_retention"] == 0.9
    # the logged table, as W&B stored it in the run's files
    table = json.loads((runs[0] / "files" / summary["squeeze/variance_table/path"]).read_text())
    assert [row[0] for row in table["data"]] == callback.analysis.candidate_ranks
    assert [row[1] for row in table["data"]] == pytest.approx(
        [callback.analysis.mean_variance[k] for k in callback.analysis.candidate_ranks]
    )


def test_only_the_main_process_writes(tmp_path):
    model = peft_llama(0)
    args = training_args(tmp_path / "run")
    state = TrainerState()
    state.is_world_process_zero = False
    callback = PostSqueezeCallback(compress=True)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    assert callback.analysis is None
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_no_lora_fails_before_training_and_bad_weights_do_not_crash_the_end(tmp_path):
    args, state, control = training_args(tmp_path / "run"), TrainerState(), TrainerControl()
    with pytest.raises(LoraMonitorError, match="no LoRA"):
        PostSqueezeCallback().on_train_begin(args, state, control, model=tiny_llama(0))
    model = peft_llama(0)
    with torch.no_grad():
        lora_layers(model)["model.layers.0.mlp.up_proj"].lora_A["default"].weight[0, 0] = float("nan")
    callback = PostSqueezeCallback()
    callback.on_train_end(args, state, control, model=model)  # logs, does not raise
    assert callback.analysis is None
    assert "model.layers.0.mlp.up_proj" in callback.error
    for bad in ({"min_variance_retention": 0}, {"candidate_ranks": [0]}, {"output_subdir": "../elsewhere"}):
        with pytest.raises(LoraMonitorError):
            PostSqueezeCallback(**bad)


@pytest.mark.slow
def test_rank_by_function_on_the_trainers_eval_dataset_by_default(tmp_path, lm_dataset, capsys):
    from lora_monitor.post_squeeze.held_out import recommend_rank_by_function

    ranks = [1, 2, 4, 8]
    # by_function="auto" (the default): the Trainer has an eval_dataset, so the rank is checked on it.
    callback = PostSqueezeCallback(compress=True, candidate_ranks=ranks, min_loss_retention=0.8)
    model = peft_llama(0, init_lora_weights=True, r=8)
    args = training_args(tmp_path / "run", max_steps=4, learning_rate=5e-2)
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_dataset, eval_dataset=lm_dataset, callbacks=[callback]
    )
    trainer.train()
    assert callback.error is None and callback.function is not None
    # the same numbers as the API on the same held-out batches
    direct = recommend_rank_by_function(
        model, list(trainer.get_eval_dataloader()), ranks=ranks, min_loss_retention=0.8, progress=False
    )
    assert callback.function.recommended_rank == direct.recommended_rank
    for rank in ranks:
        assert callback.function.evaluations[rank].loss == pytest.approx(direct.evaluations[rank].loss)
    assert callback.function.energy_recommended_rank == callback.analysis.recommended_rank
    out = capsys.readouterr().out
    assert "Rank by function" in out and "by function" in out
    assert "upper bound" not in out
    manifest = json.loads((tmp_path / "run" / "squeeze_manifest.json").read_text())
    assert manifest["recommendation_basis"] == "held-out loss"
    assert manifest["function"]["recommended_rank"] == direct.recommended_rank
    assert manifest["function"]["rule"] == "retention" and manifest["function"]["min_loss_retention"] == 0.8
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "run" / "squeezed")
    for name, layer in lora_layers(reloaded).items():
        assert layer.r["default"] == direct.recommended_rank, name


@pytest.mark.slow
def test_auto_keeps_the_table_compression_and_manifest_when_held_out_data_cannot_be_measured(
    tmp_path, lm_dataset
):
    # An eval_dataset that scores no token: by_function="auto" must not lose what energy alone gives.
    unscored = lm_dataset.map(lambda row: {"labels": [-100] * len(row["labels"])})
    callback = PostSqueezeCallback(compress=True, candidate_ranks=[1, 2, 4, 8], min_variance_retention=0.5)
    model = peft_llama(0, init_lora_weights=True, r=8)
    args = training_args(tmp_path / "run", max_steps=4, learning_rate=5e-2)
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_dataset, eval_dataset=unscored, callbacks=[callback]
    )
    trainer.train()
    assert callback.function is None and "rank by function not measured" in callback.error
    assert callback.analysis is not None and callback.compression is not None
    manifest = json.loads((tmp_path / "run" / "squeeze_manifest.json").read_text())
    assert manifest["recommendation_basis"] == "energy (upper bound)"
    assert (tmp_path / "run" / "squeezed" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_held_out_data_without_labels_is_found_before_the_first_step(tmp_path, lm_dataset, caplog):
    # The Trainer's default collator adds no labels: nothing to measure held-out loss with.
    unlabelled = lm_dataset.remove_columns("labels")

    def trainer(by_function, folder):
        args = training_args(tmp_path / folder, max_steps=2)
        callback = PostSqueezeCallback(by_function=by_function, candidate_ranks=[1, 2, 4, 8])
        built = Trainer(
            model=peft_llama(0, init_lora_weights=True, r=8),
            args=args,
            train_dataset=lm_dataset,
            eval_dataset=unlabelled,
            callbacks=[callback],
        )
        return built, callback

    strict, _ = trainer(True, "strict")
    with pytest.raises(LoraMonitorError, match=r"gives batches without labels .*by_function=False"):
        strict.train()
    assert strict.state.global_step == 0 and not (tmp_path / "strict" / "squeeze_manifest.json").exists()
    auto, callback = trainer("auto", "auto")
    auto.train()
    assert "the energy rank is recommended instead" in caplog.text
    assert callback.function is None and callback.error is None
    manifest = json.loads((tmp_path / "auto" / "squeeze_manifest.json").read_text())
    assert manifest["recommendation_basis"] == "energy (upper bound)"


def test_rank_by_function_without_held_out_data_fails_before_training(tmp_path, lm_dataset):
    callback = PostSqueezeCallback(by_function=True)
    with pytest.raises(LoraMonitorError, match="eval_dataset"):
        train(tmp_path, lm_dataset, callback)
    assert not (tmp_path / "run" / "squeeze_manifest.json").exists()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PostSqueezeCallback(tolerance=-0.5), "PostSqueezeCallback: tolerance must be at least 0"),
        (lambda: PostSqueezeCallback(by_function="yes"), "by_function must be True, False or 'auto'"),
        (
            lambda: PostSqueezeCallback(min_loss_retention=0),
            "PostSqueezeCallback: min_loss_retention must be above 0 and at most 1, got 0",
        ),
        (
            lambda: PostSqueezeCallback(tolerance=float("nan")),
            "PostSqueezeCallback: tolerance must be a finite",
        ),
        (lambda: PostSqueezeCallback(tolerance="0.01"), "PostSqueezeCallback: tolerance must be a number"),
        (lambda: PostSqueezeCallback(by_function=True, eval_batches=[]), "eval_batches is empty"),
        (lambda: PostSqueezeCallback(eval_batches="held-out.txt"), "eval_batches must be a list of batches"),
        (lambda: PostSqueezeCallback(eval_batches=[{"input_ids": 1}, 2]), "must be a dict of model inputs"),
        (
            lambda: PostSqueezeCallback(eval_batches=[{"input_ids": torch.ones(1, 3, dtype=torch.long)}]),
            "batch 0 of eval_batches has no labels",
        ),
        (
            lambda: SpectralMonitorCallback(jsonl_name="/tmp/elsewhere.jsonl"),
            "jsonl_name must be a file name",
        ),
        (lambda: SpectralMonitorCallback(jsonl_name="../up.jsonl"), "jsonl_name must be a file name"),
    ],
)
def test_bad_options_are_refused_when_the_callback_is_built(build, message):
    with pytest.raises(LoraMonitorError, match=message):
        build()


class _StepsBegun(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PostSqueezeCallback(by_function=True), "needs held-out data"),
        (
            lambda: PostSqueezeCallback(candidate_ranks=[4, 16]),
            r"PostSqueezeCallback: candidate_ranks \[4, 16\] holds 16, above the adapter's largest rank 8",
        ),
        (lambda: PostSqueezeCallback(adapter_name="other"), "adapter 'other' is not in"),
        (lambda: SpectralMonitorCallback(adapter_name="other"), "adapter 'other' is not in"),
    ],
)
def test_what_needs_the_trainer_is_checked_before_the_first_step(build, message, tmp_path, lm_dataset):
    steps = _StepsBegun()
    model = peft_llama(0, init_lora_weights=True, r=8)
    args = training_args(tmp_path / "run", max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[build(), steps])
    with pytest.raises(LoraMonitorError, match=message):
        trainer.train()
    assert steps.steps == [] and trainer.state.global_step == 0
    assert not (tmp_path / "run" / "squeeze_manifest.json").exists()
    assert not (tmp_path / "run" / "lora_monitor.jsonl").exists()


@pytest.mark.slow
def test_looking_at_the_held_out_data_leaves_training_as_it_was(tmp_path, lm_dataset):
    # The label check before the first step starts the eval loader, which draws from the global RNG: with
    # dropout, every later mask would differ from a run without the callback's measurement.
    def losses(by_function):
        args = training_args(tmp_path / str(by_function), max_steps=4)
        trainer = Trainer(
            model=peft_llama(0, init_lora_weights=True, r=8, lora_dropout=0.1),
            args=args,
            train_dataset=lm_dataset,
            eval_dataset=lm_dataset,
            callbacks=[PostSqueezeCallback(by_function=by_function, candidate_ranks=[1, 2, 4, 8])],
        )
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert losses("auto") == losses(False)
