"""A resumed In-Squeeze run is the uninterrupted run, from a checkpoint at any step (a property).

For each configuration: one uninterrupted run of 8 steps that saves a checkpoint at every step, with squeezes
8 → 4 after step 2 and 4 → 2 after step 5 (re-warm-up ramps, when on, over steps 3-4 and 6-7); then a fresh
model and a fresh Trainer resume from each checkpoint, and the final adapter must equal the uninterrupted
one. The configurations cover every pair of values of: mode (resize, mask), lr_scaling (rank, sqrt, none),
re-warm-up (on, off) and a per-module threshold (min_variance_retention, on, off).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tiny_models import tiny_llama, training_args
from transformers import Trainer

from lora_monitor import LoraMonitorError
from lora_monitor.callbacks.in_squeeze import InSqueezeCallback
from lora_monitor.in_squeeze import current_ranks
from lora_monitor.in_squeeze.resume import check_resumed_ranks

MAX_STEPS = 8
SCHEDULE = dict(target_rank=2, schedule=[(2, 4), (5, 2)])
THRESHOLD = 0.75  # per-module ranks: some modules keep more than the schedule's cap
CONFIGS = {
    "resize-rank-rewarmup": dict(mode="resize", lr_scaling="rank", rewarmup_steps=2),
    "resize-sqrt-threshold": dict(mode="resize", lr_scaling="sqrt", min_variance_retention=THRESHOLD),
    "resize-none": dict(mode="resize", lr_scaling="none"),
    "mask-rank-threshold": dict(mode="mask", lr_scaling="rank", min_variance_retention=THRESHOLD),
    "mask-sqrt-rewarmup": dict(mode="mask", lr_scaling="sqrt", rewarmup_steps=2),
    "mask-none-rewarmup-threshold": dict(
        mode="mask", lr_scaling="none", rewarmup_steps=2, min_variance_retention=THRESHOLD
    ),
}


def _model():
    # One block, three LoRA modules of different shapes (64×64, 32×64, 64×128), random factors.
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(0, num_hidden_layers=1), config)
    # q_proj's update decays fast (its rows of A halve one after the other), the others' are flat: under a
    # threshold the modules keep different ranks.
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("q_proj.lora_A.default"):
                module.weight.mul_(0.5 ** torch.arange(8.0)[:, None])
    return model


def _train(output_dir, dataset, options, resume=None, **overrides):
    callback = InSqueezeCallback(**SCHEDULE, **options)
    saving = dict(save_strategy="steps", save_steps=1) if resume is None else {}
    args = training_args(
        output_dir, **{"max_steps": MAX_STEPS, "logging_steps": MAX_STEPS, **saving, **overrides}
    )
    trainer = Trainer(model=_model(), args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    adapter = {key: value.detach().clone() for key, value in get_peft_model_state_dict(trainer.model).items()}
    return trainer, callback, adapter


def _differences(adapter, reference) -> str | None:
    if adapter.keys() != reference.keys() or any(adapter[k].shape != reference[k].shape for k in reference):
        return "shapes differ"
    relative = max(float((adapter[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
    return None if relative < 1e-5 else f"relative difference {relative:.2e}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # About 50 short runs of a tiny model: one thread is several times faster than two on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    from tiny_models import make_lm_dataset

    return make_lm_dataset(tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resuming_from_every_step_ends_like_the_uninterrupted_run(name, tmp_path, dataset):
    options = CONFIGS[name]
    _, callback, final = _train(tmp_path / "run", dataset, options)
    assert [event["step"] for event in callback.events] == [2, 5]
    ranks = list(callback.events[-1]["ranks"].values())
    if "min_variance_retention" in options:
        assert len(set(ranks)) > 1 and min(ranks) == 2  # per-module ranks, the cap as floor
    else:
        assert set(ranks) == {2}

    mismatches = {}
    for step in range(1, MAX_STEPS):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        _, _, adapter = _train(tmp_path / f"resumed-{step}", dataset, options, resume=str(checkpoint))
        difference = _differences(adapter, final)
        if difference:
            mismatches[step] = difference
    assert mismatches == {}, f"{name}: resumed runs that differ from the uninterrupted one: {mismatches}"


def test_a_trainer_that_restores_callbacks_from_the_checkpoint_resumes_the_same(tmp_path, dataset):
    # restore_callback_states_from_checkpoint: the Trainer replaces the callback by one rebuilt from the saved
    # arguments, which first sees the model after the squeezed checkpoint is loaded: the source ranks (and
    # so the step scaling) and the ramp must come from the checkpoint, not from that model.
    options = CONFIGS["resize-rank-rewarmup"]
    _, _, final = _train(tmp_path / "run", dataset, options)
    resumed, original, adapter = _train(
        tmp_path / "resumed",
        dataset,
        options,
        resume=str(tmp_path / "run" / "checkpoint-3"),
        restore_callback_states_from_checkpoint=True,
    )
    rebuilt = [c for c in resumed.callback_handler.callbacks if isinstance(c, InSqueezeCallback)]
    assert len(rebuilt) == 1 and rebuilt[0] is not original
    assert rebuilt[0].run.step_scaling.source_ranks == dict.fromkeys(current_ranks(resumed.model), 8)
    assert _differences(adapter, final) is None


def test_the_checkpoint_keeps_the_in_squeeze_state(tmp_path, dataset):
    _train(tmp_path / "run", dataset, CONFIGS["resize-rank-rewarmup"], max_steps=3)
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["InSqueezeCallback"]
    assert entry["args"]["schedule"] == [[2, 4], [5, 2]] and entry["args"]["rewarmup_steps"] == 2
    state = entry["lora_monitor_in_squeeze"]
    assert state["plan"] == [[2, 4], [5, 2]]
    assert set(state["source_ranks"].values()) == {8} and set(state["ranks"].values()) == {4}
    assert state["rewarmup"]["from"] == 2 and len(state["rewarmup"]["unscaled"]) >= 1


def test_a_model_that_comes_back_at_other_ranks_is_refused():
    with pytest.raises(
        LoraMonitorError, match=r"saved with a\.q at rank 4, but the resumed model has it at rank 8"
    ):
        check_resumed_ranks({"a.q": 4, "a.v": 4}, {"a.q": 8, "a.v": 4}, "InSqueezeCallback")
    check_resumed_ranks({"a.q": 4}, {"a.q": 4}, "InSqueezeCallback")


def test_two_in_squeeze_callbacks_each_read_their_own_latest_state():
    """transformers appends every save of a class with several ExportableState callbacks to one list (after
    the entries written when the Trainer was built): each callback reads the latest save, at its own place."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from lora_monitor.in_squeeze.resume import RESUME_KEY

    first, second = InSqueezeCallback(target_rank=4), InSqueezeCallback(target_rank=2, adapter_name="other")
    for callback in (first, second):
        callback._handler = SimpleNamespace(callbacks=[first, second])

    def entry(callback, source_rank):
        saved = callback.state()
        saved[RESUME_KEY]["source_ranks"] = {"module": source_rank}
        return saved

    at_init = [entry(first, 1), entry(second, 2)]  # what TrainerState holds from the Trainer's __init__
    state = TrainerState(
        stateful_callbacks={"InSqueezeCallback": [*at_init, entry(first, 16), entry(second, 32)]}
    )
    (saved_first, same_first), (saved_second, same_second) = (
        first._saved_state(state),
        second._saved_state(state),
    )
    assert saved_first.source_ranks == {"module": 16} and same_first
    assert saved_second.source_ranks == {"module": 32} and same_second
