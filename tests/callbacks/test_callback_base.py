"""The one binding of the three callbacks to a real Trainer: ``attach`` means the same on each, and
Post-Squeeze measures on the eval dataloader the Trainer hands it."""

from __future__ import annotations

import pytest
from tiny_models import peft_llama, training_args
from transformers import Trainer, TrainerCallback

from lora_monitor import recommend_rank_by_function
from lora_monitor.callbacks import InSqueezeCallback, PostSqueezeCallback, SpectralMonitorCallback

CALLBACKS = {
    "monitor": lambda: SpectralMonitorCallback(every_n_steps=1, jsonl_name=None, track_gradients=False),
    "in_squeeze": lambda: InSqueezeCallback(target_rank=2, schedule=[(1, 4), (2, 2)]),
    "post_squeeze": lambda: PostSqueezeCallback(print_table=False, intruders=False, by_function=False),
}
# A key each callback logs as its own event, so it shows whether that event went through the Trainer.
LOGGED_KEY = {"monitor": "lora/num_modules", "in_squeeze": "in_squeeze/rank_mean", "post_squeeze": None}


class RecordingCallback(TrainerCallback):
    """Stands in for a reporting integration (W&B, TensorBoard): it sees every log event of the handler."""

    def __init__(self):
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def _trainer(tmp_path, lm_dataset, callbacks=(), steps=2, **overrides) -> Trainer:
    return Trainer(
        model=peft_llama(0, init_lora_weights=True, r=8),
        args=training_args(tmp_path, max_steps=steps, **overrides),
        train_dataset=lm_dataset,
        callbacks=list(callbacks),
    )


def _registered(trainer: Trainer, callback: TrainerCallback) -> int:
    return sum(c is callback for c in trainer.callback_handler.callbacks)


@pytest.mark.parametrize("kind", list(CALLBACKS))
def test_attach_adds_the_callback_once_binds_the_trainer_and_it_runs_there(kind, tmp_path, lm_dataset):
    recorder = RecordingCallback()
    trainer = _trainer(tmp_path, lm_dataset, callbacks=[recorder])
    callback = CALLBACKS[kind]()
    assert callback.attach(trainer) is callback
    assert callback.attach(trainer) is callback  # attaching again adds nothing
    assert _registered(trainer, callback) == 1
    assert callback._trainer is trainer and callback._handler is trainer.callback_handler
    trainer.train()
    if kind == "monitor":
        assert callback.history.steps == [0, 1, 2]
    elif kind == "in_squeeze":
        assert [event["step"] for event in callback.events] == [1, 2]
    else:
        assert callback.error is None and callback.analysis is not None
    if LOGGED_KEY[kind] is not None:  # its own log events reached the Trainer's integrations
        assert any(LOGGED_KEY[kind] in logs for logs in recorder.logged)


@pytest.mark.parametrize("kind", list(CALLBACKS))
def test_attach_after_passing_it_in_callbacks_does_not_register_it_twice(kind, tmp_path, lm_dataset):
    callback = CALLBACKS[kind]()
    trainer = _trainer(tmp_path, lm_dataset, callbacks=[callback])
    callback.attach(trainer)
    assert _registered(trainer, callback) == 1
    assert callback._trainer is trainer and callback._handler is trainer.callback_handler


def test_post_squeeze_measures_on_the_eval_dataloader_the_trainer_hands_it(tmp_path, lm_dataset):
    # No eval_dataset on the Trainer: the held-out data is what the user evaluated on before training, and
    # it reaches the callback only as the handler's eval_dataloader.
    held_out = lm_dataset.select(range(8))
    ranks = [1, 2, 4, 8]
    callback = PostSqueezeCallback(
        target_ranks=ranks, by_function=True, print_table=False, intruders=False, tolerance=0.001
    )
    trainer = _trainer(tmp_path, lm_dataset, callbacks=[callback], steps=3, learning_rate=5e-2)
    trainer.evaluate(eval_dataset=held_out)
    trainer.train()
    assert callback.error is None and callback.function is not None
    direct = recommend_rank_by_function(
        trainer.model,
        list(trainer.get_eval_dataloader(held_out)),
        ranks=ranks,
        tolerance=0.001,
        progress=False,
    )
    assert callback.function.recommended_rank == direct.recommended_rank
    for rank in ranks:
        assert callback.function.evaluations[rank].loss == pytest.approx(direct.evaluations[rank].loss)
