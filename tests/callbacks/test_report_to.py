"""The callbacks' numbers reach TensorBoard and MLflow through the Trainer's own ``report_to``, offline.

Each run is read back with the tool's own reader: TensorBoard's ``EventAccumulator`` on the event files,
MLflow's client on its local file store. Checked: the ``lora/*`` scalars of every check (equal to the
callback's own values), the alert count, and the Post-Squeeze summary.
"""

from __future__ import annotations

import pytest
from tiny_models import make_lm_dataset, peft_llama, training_args
from transformers import Trainer

from lora_monitor.callbacks import PostSqueezeCallback, SpectralMonitorCallback

STEPS = 6
EVERY = 3


def _train(tmp_path, tokenizer, report_to, **arg_overrides):
    monitor = SpectralMonitorCallback(every_n_steps=EVERY)
    squeeze = PostSqueezeCallback(min_variance_retention=0.9)
    trainer = Trainer(
        model=peft_llama(0),
        args=training_args(tmp_path / "run", max_steps=STEPS, report_to=report_to, **arg_overrides),
        train_dataset=make_lm_dataset(tokenizer),
        callbacks=[monitor, squeeze],
    )
    trainer.train()
    return monitor, squeeze


@pytest.mark.slow
def test_tensorboard_receives_monitor_scalars_alerts_and_squeeze_summary(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor, squeeze = _train(tmp_path, tokenizer, ["tensorboard"])
    event_files = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert event_files, "the Trainer wrote no TensorBoard event file"
    values: dict[str, dict[int, float]] = {}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                values.setdefault(tag, {})[event.step] = event.value

    # The Trainer's TensorBoard callback prefixes training logs with "train/".
    effective_rank = values["train/lora/mean_effective_rank"]
    assert sorted(effective_rank) == [0, EVERY, STEPS]
    assert effective_rank[STEPS] == pytest.approx(
        monitor.latest_scalars["lora/mean_effective_rank"], rel=1e-6
    )
    assert values["train/lora/alerts_total"][STEPS] == len(monitor.alerts)
    assert "train/lora/attention/mean_effective_rank" in values

    assert squeeze.analysis is not None and squeeze.analysis.recommended_rank is not None
    recommended = values["train/squeeze/recommended_rank"]
    assert list(recommended.values()) == [squeeze.analysis.recommended_rank]
    assert list(values["train/squeeze/source_rank"].values()) == [8]
    assert squeeze.intruder_dimensions is not None and len(squeeze.intruder_dimensions) == 14
    intruders = sum(record.count for record in squeeze.intruder_dimensions)
    assert list(values["train/squeeze/intruder_dimensions"].values()) == [intruders]


@pytest.mark.slow
def test_mlflow_file_store_receives_monitor_scalars_alerts_and_squeeze_summary(
    tmp_path, tokenizer, monkeypatch
):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lora-monitor-test")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    # MLflow 3 keeps the file store for offline use behind this switch (a database needs a server package).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    monitor, squeeze = _train(tmp_path, tokenizer, ["mlflow"])
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("lora-monitor-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    run_id = runs[0].info.run_id

    def history(key: str) -> dict[int, float]:
        return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}

    # MLflow metric names cannot hold every character; the Trainer's callback keeps "/" as it is.
    effective_rank = history("lora/mean_effective_rank")
    assert sorted(effective_rank) == [0, EVERY, STEPS]
    assert effective_rank[STEPS] == pytest.approx(
        monitor.latest_scalars["lora/mean_effective_rank"], rel=1e-6
    )
    assert history("lora/alerts_total")[STEPS] == len(monitor.alerts)
    assert history("lora/max_dominance")[STEPS] == pytest.approx(monitor.latest_scalars["lora/max_dominance"])
    assert squeeze.analysis is not None and squeeze.analysis.recommended_rank is not None
    assert list(history("squeeze/recommended_rank").values()) == [squeeze.analysis.recommended_rank]
