"""The rules of an In-Squeeze run that ``InSqueezeCallback`` calls, checked without a Trainer on real PEFT
models: the plan that can never squeeze, the mode of a distributed run, the checkpoint's state read back
and restored, and masks compacted at the end."""

from __future__ import annotations

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor import LoraMonitorError
from lora_monitor.adapters import factor_parameters, find_lora_modules
from lora_monitor.in_squeeze import (
    InSqueezeOptions,
    LearningRateRewarmup,
    compact_after_training,
    current_ranks,
    squeeze_model,
)
from lora_monitor.in_squeeze.options import run_is_distributed, schedule_as_json
from lora_monitor.in_squeeze.resume import RESUME_KEY, InSqueezeResumeState, read_resume_state
from lora_monitor.in_squeeze.schedule import check_something_to_squeeze, plan_for
from lora_monitor.in_squeeze.step_scaling import SqueezedStepScaling


def _source_rank(model) -> int:
    return max(record.rank for record in find_lora_modules(model))


def test_a_target_at_the_adapters_rank_is_refused_with_the_callbacks_message():
    model = peft_llama(r=8)
    options = InSqueezeOptions(target_rank=8, where="InSqueezeCallback")
    plan = plan_for(options, _source_rank(model), max_steps=10)
    assert plan == {}
    with pytest.raises(LoraMonitorError) as raised:
        check_something_to_squeeze(plan, _source_rank(model), options, "default")
    assert str(raised.value) == (
        "InSqueezeCallback: target_rank=8 is at or above the rank of every LoRA module of adapter 'default' "
        "(largest: 8), so nothing would ever be squeezed; give a rank below 8"
    )


def test_a_schedule_that_never_goes_below_the_rank_is_refused_as_the_checkpoint_writes_it():
    model = peft_llama(r=4)
    options = InSqueezeOptions(target_rank=2, schedule=[(2, 8), (5, 4)])
    plan = plan_for(options, _source_rank(model), max_steps=10)
    assert plan == {2: 8, 5: 4}
    with pytest.raises(
        LoraMonitorError, match=r"^InSqueezeOptions: every rank of schedule=\[\[2, 8\], \[5, 4\]\] is"
    ):
        check_something_to_squeeze(plan, _source_rank(model), options, "default")


def test_a_plan_that_lowers_the_rank_passes():
    model = peft_llama(r=8)
    options = InSqueezeOptions(target_rank=2, start_step=2, end_step=6)
    plan = plan_for(options, _source_rank(model), max_steps=10)
    assert min(plan.values()) == 2
    check_something_to_squeeze(plan, _source_rank(model), options, "default")


def test_schedule_as_json_keeps_names_and_turns_pairs_into_lists():
    assert schedule_as_json("linear") == "linear"
    assert schedule_as_json([(0.5, 4), (7, 2)]) == [[0.5, 4], [7, 2]]


@pytest.mark.parametrize(
    "world_size, deepspeed, fsdp, distributed",
    [
        (1, None, "", False),
        (1, None, [], False),
        (2, None, "", True),
        (1, "ds_config.json", "", True),
        (1, None, "full_shard", True),
        (1, None, ["full_shard", "auto_wrap"], True),
    ],
)
def test_a_run_is_distributed_by_its_processes_deepspeed_or_fsdp(world_size, deepspeed, fsdp, distributed):
    assert not torch.distributed.is_initialized()  # this test process has no process group
    assert run_is_distributed(world_size, deepspeed, fsdp) is distributed
    auto = InSqueezeOptions(mode="auto")
    assert auto.resolve_mode(run_is_distributed(world_size, deepspeed, fsdp)) == (
        "mask" if distributed else "resize"
    )


def test_resize_is_refused_in_a_run_under_fsdp():
    with pytest.raises(
        LoraMonitorError, match="InSqueezeCallback: mode='resize' cannot change the parameter"
    ):
        InSqueezeOptions(mode="resize", where="InSqueezeCallback").resolve_mode(
            run_is_distributed(fsdp="full_shard")
        )


def test_masks_are_compacted_at_the_end_of_a_single_process_run_only():
    model = peft_llama(r=8)
    inputs = torch.randint(3, 100, (2, 6))
    squeeze_model(model, 4, mode="mask")
    with torch.no_grad():
        before = model(input_ids=inputs).logits
    layer = find_lora_modules(model)[0].module

    assert compact_after_training(model, "mask", distributed=True) == []  # DDP/FSDP keep their parameters
    assert compact_after_training(model, "resize", distributed=False) == []  # nothing masked to compact
    assert factor_parameters(layer, "default")[1].shape[0] == 8

    events = compact_after_training(model, "mask", distributed=False)
    assert len(events) == len(find_lora_modules(model)) and {e.new_rank for e in events} == {4}
    assert factor_parameters(layer, "default")[1].shape[0] == 4
    assert set(current_ranks(model).values()) == {4}
    with torch.no_grad():  # the dropped directions were zero: the same function
        torch.testing.assert_close(model(input_ids=inputs).logits, before)


def _saved_entry(model, arguments):
    state = InSqueezeResumeState(
        source_ranks={name: 8 for name in current_ranks(model)},
        plan={3: 4},
        rewarmup={"from": None, "unscaled": None},
        ranks=current_ranks(model),
    )
    return {"args": arguments, "attributes": {}, RESUME_KEY: state.to_json()}


def test_the_saved_state_is_read_back_with_whether_the_arguments_match():
    model = peft_llama(r=8)
    arguments = {"target_rank": 4, "schedule": "geometric"}
    entry = _saved_entry(model, arguments)
    saved, same = read_resume_state(
        {"InSqueezeCallback": entry}, "InSqueezeCallback", 0, 1, arguments, "here"
    )
    assert same and saved.plan == {3: 4} and saved.ranks == current_ranks(model)
    _, same = read_resume_state(
        {"InSqueezeCallback": entry}, "InSqueezeCallback", 0, 1, {"target_rank": 2}, ""
    )
    assert not same
    # A checkpoint written without this callback's state (or without the callback): nothing to restore.
    assert read_resume_state({}, "InSqueezeCallback", 0, 1, arguments, "") == (None, False)
    assert read_resume_state({"InSqueezeCallback": {"args": {}}}, "InSqueezeCallback", 0, 1, {}, "") == (
        None,
        False,
    )
    broken = {"InSqueezeCallback": {RESUME_KEY: {"version": 99}}}
    with pytest.raises(
        LoraMonitorError, match=r"^InSqueezeCallback: trainer_state\.json: the saved In-Squeeze"
    ):
        read_resume_state(broken, "InSqueezeCallback", 0, 1, {}, "InSqueezeCallback: trainer_state.json")


def test_restoring_gives_back_the_source_ranks_and_the_rewarmup_ramp():
    model = peft_llama(r=8)
    source_ranks = {name: 8 for name in current_ranks(model)}
    squeeze_model(model, 4)  # what a resumed model holds once the checkpoint is loaded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    step_scaling, rewarmup = SqueezedStepScaling("rank"), LearningRateRewarmup(2)
    saved = InSqueezeResumeState(
        source_ranks=source_ranks,
        plan={3: 4},
        rewarmup={"from": 3, "unscaled": [0.3]},
        ranks=current_ranks(model),
    )
    source_rank = saved.restore_into(
        model,
        optimizer,
        3,
        adapter_name="default",
        step_scaling=step_scaling,
        rewarmup=rewarmup,
        where="here",
    )
    assert source_rank == 8 and step_scaling.source_ranks == source_ranks
    # Inside the ramp: the step after step 3 runs at 1/3 of the scheduler's rate, as in the uninterrupted run.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    # The rank scaling divides by the source ranks, not by the ranks the resumed model came back at.
    assert set(step_scaling.factors(model).values()) == {2.0}


def test_restoring_a_state_without_source_ranks_leaves_the_models_own():
    model = peft_llama(r=8)
    step_scaling = SqueezedStepScaling("rank")
    saved = InSqueezeResumeState(source_ranks={}, plan={}, rewarmup={}, ranks=None)
    assert (
        saved.restore_into(
            model,
            None,
            1,
            adapter_name=None,
            step_scaling=step_scaling,
            rewarmup=LearningRateRewarmup(0),
            where="",
        )
        is None
    )
    assert step_scaling.source_ranks is None


def test_restoring_into_a_model_at_other_ranks_is_refused_naming_where():
    model = peft_llama(r=8)
    saved = InSqueezeResumeState(
        source_ranks={}, plan={}, rewarmup={}, ranks={name: 4 for name in current_ranks(model)}
    )
    with pytest.raises(
        LoraMonitorError, match=r"^InSqueezeCallback: the checkpoint was saved with .* at rank 4"
    ):
        saved.restore_into(
            model,
            None,
            1,
            adapter_name=None,
            step_scaling=SqueezedStepScaling(),
            rewarmup=LearningRateRewarmup(0),
            where="InSqueezeCallback",
        )
