"""InSqueezeCallback in a real transformers Trainer: r 16 → 4 over steps 20-40, trained to step 60."""

from __future__ import annotations

import statistics

import pytest
import torch
from peft import PeftModel
from tiny_models import make_lm_dataset, peft_llama, tiny_llama, training_args
from transformers import Trainer, TrainerCallback

from lora_monitor import LoraMonitorError, find_lora_modules, load_adapter
from lora_monitor.callbacks.in_squeeze import InSqueezeCallback
from lora_monitor.in_squeeze import current_ranks, plan_schedule, resolve_step, unwrap_optimizer

MAX_STEPS = 60
SQUEEZE = dict(target_rank=4, schedule="geometric", start_step=20, end_step=40)


class _OptimizerAudit(TrainerCallback):
    """After every step: are the optimizer's Parameters exactly the model's trainable ones?"""

    def __init__(self) -> None:
        self.mismatches: list[int] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimized = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if optimized != trainable:
            self.mismatches.append(state.global_step)


def _train(output_dir, tokenizer, callbacks, resume=None, **overrides):
    model = peft_llama(r=16, lora_alpha=32, init_lora_weights=True)
    overrides.setdefault("max_steps", MAX_STEPS)
    args = training_args(output_dir, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=make_lm_dataset(tokenizer), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 12, 7, 30, 4, 2]])


def _assert_reloads_same(trainer, folder):
    trainer.model.save_pretrained(folder)
    assert {m.rank for m in load_adapter(folder)} == {4}
    reloaded = PeftModel.from_pretrained(tiny_llama(0), folder)
    assert torch.allclose(_logits(reloaded, IDS), _logits(trainer.model, IDS), atol=1e-5)


class _LogSink(TrainerCallback):
    """Sees what a report_to integration sees: every on_log event."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


@pytest.fixture(scope="module")
def resize_run(tmp_path_factory, tokenizer):
    sink = _LogSink()
    squeeze = InSqueezeCallback(**SQUEEZE)
    audit = _OptimizerAudit()
    # The checkpoint at step 45 (after both squeezes) is what the resume test starts from.
    trainer = _train(
        tmp_path_factory.mktemp("resize"),
        tokenizer,
        [sink, squeeze, audit],
        save_strategy="steps",
        save_steps=45,
    )
    trainer.log_sink = sink
    return trainer, squeeze, audit


@pytest.mark.slow
def test_resize_run_ends_at_the_target_rank_and_reloads(resize_run, tmp_path):
    trainer, squeeze, audit = resize_run
    assert trainer.state.global_step == MAX_STEPS
    assert squeeze.resolved_mode == "resize"
    assert [event["step"] for event in squeeze.events] == [20, 40]
    assert [set(event["ranks"].values()) for event in squeeze.events] == [{8}, {4}]
    assert set(current_ranks(trainer.model).values()) == {4}
    for record in find_lora_modules(trainer.model):
        assert record.A_shape[0] == 4 and record.scale == pytest.approx(2.0)  # alpha/r = 32/16, kept
    assert audit.mismatches == []
    assert squeeze.lost_progress is None  # the loss kept falling through both squeezes
    _assert_reloads_same(trainer, tmp_path / "adapter")


@pytest.mark.slow  # the module's Trainer run
def test_resize_run_logs_each_squeeze_and_keeps_learning(resize_run):
    trainer, _, _ = resize_run
    logged = [entry for entry in trainer.state.log_history if "in_squeeze/rank_mean" in entry]
    assert [(entry["step"], entry["in_squeeze/rank_mean"]) for entry in logged] == [(20, 8.0), (40, 4.0)]
    # Integrations (report_to) get the same events through on_log, even when listed before this callback.
    reported = [
        (step, logs["in_squeeze/rank_mean"])
        for step, logs in trainer.log_sink.logs
        if "in_squeeze/rank_mean" in logs
    ]
    assert reported == [(20, 8.0), (40, 4.0)]
    for entry in logged:
        assert (
            0 < entry["in_squeeze/retained_variance_min"] <= entry["in_squeeze/retained_variance_mean"] <= 1
        )
        assert entry["in_squeeze/loss_jump"] == pytest.approx(
            entry["in_squeeze/loss_after"] - entry["in_squeeze/loss_before"]
        )
    losses = _losses(trainer)
    # The squeeze's own log event must not swallow the Trainer's loss log of the same step (logging_steps=1).
    assert trainer.args.logging_steps == 1
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    after_last_squeeze = statistics.mean(losses[step] for step in range(41, 51))
    last = statistics.mean(losses[step] for step in range(51, 61))
    assert last < after_last_squeeze
    first = statistics.mean(losses[step] for step in range(1, 11))
    assert last < first
    # The LR scheduler holds the optimizer, not the parameters: its linear decay runs on through the squeezes.
    rates = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert rates == pytest.approx({step: 5e-3 * (MAX_STEPS + 1 - step) / MAX_STEPS for step in rates})


@pytest.mark.slow
def test_resume_after_a_squeeze_finishes_like_the_uninterrupted_run(resize_run, tmp_path, tokenizer):
    reference, _, _ = resize_run
    checkpoint = f"{reference.args.output_dir}/checkpoint-45"
    assert {m.rank for m in load_adapter(checkpoint)} == {4}

    squeeze = InSqueezeCallback(**SQUEEZE)
    audit = _OptimizerAudit()
    resumed = _train(tmp_path, tokenizer, [squeeze, audit], resume=checkpoint)
    assert resumed.state.global_step == MAX_STEPS
    assert squeeze.events == []  # both squeezes were before the checkpoint
    assert set(current_ranks(resumed.model).values()) == {4}
    assert audit.mismatches == []
    # The optimizer state came back (step counts continue), so the run ends where the uninterrupted one did.
    state = unwrap_optimizer(resumed.optimizer).state
    assert {float(s["step"]) for s in state.values()} == {float(MAX_STEPS)}
    assert torch.allclose(_logits(resumed.model, IDS), _logits(reference.model, IDS), atol=1e-4)
    # The lost-progress check's losses came back from trainer_state.json: the same numbers at the end.
    whole, again = resize_run[1].run.lost_progress_watch.state(), squeeze.run.lost_progress_watch.state()
    assert again["first_squeeze_step"] == whole["first_squeeze_step"] == 20
    assert again["reference"] == pytest.approx(whole["reference"], abs=1e-5)
    assert again["after"] == pytest.approx(whole["after"], abs=1e-4)
    assert again["after"][0] == MAX_STEPS - 40
    _assert_reloads_same(resumed, tmp_path / "adapter")


@pytest.mark.slow
def test_mask_mode_keeps_shapes_while_training_saves_the_reduced_rank_and_resumes(tmp_path, tokenizer):
    shapes: dict[int, tuple[int, ...]] = {}

    class _Shapes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            # The parameters themselves (records show only the kept directions of a masked module).
            layer = find_lora_modules(model)[0].module
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            shapes[state.global_step] = tuple(A.shape)
            if state.global_step > 12:  # after the last squeeze the dropped directions stay exactly zero
                assert A[4:].abs().max() == 0 and B[:, 4:].abs().max() == 0

    squeeze_args = dict(SQUEEZE, start_step=6, end_step=12, mode="mask")
    run_args = dict(save_strategy="steps", save_steps=14, max_steps=16)
    squeeze = InSqueezeCallback(**squeeze_args)
    audit = _OptimizerAudit()
    trainer = _train(tmp_path, tokenizer, [squeeze, audit, _Shapes()], **run_args)
    assert squeeze.resolved_mode == "mask"
    assert {shape[0] for shape in shapes.values()} == {16}  # never resized while training
    assert audit.mismatches == []
    assert [(event["step"], set(event["ranks"].values())) for event in squeeze.events] == [
        (6, {8}),
        (12, {4}),
    ]
    # The checkpoint written while the shapes were still 16 holds the rank-4 adapter, and it reloads.
    checkpoint = tmp_path / "checkpoint-14"
    assert {m.rank for m in load_adapter(checkpoint)} == {4}
    PeftModel.from_pretrained(tiny_llama(0), checkpoint)
    # At the end of a single-process run the masked modules were compacted for real.
    assert find_lora_modules(trainer.model)[0].A_shape[0] == 4
    _assert_reloads_same(trainer, tmp_path / "adapter")

    # Resume on a freshly built rank-16 model: the rank-4 checkpoint is padded, the mask restored.
    shapes.clear()
    resumed = _train(
        tmp_path,
        tokenizer,
        [InSqueezeCallback(**squeeze_args), _Shapes()],
        resume=str(checkpoint),
        **run_args,
    )
    assert set(shapes) == {15, 16} and {shape[0] for shape in shapes.values()} == {16}
    assert find_lora_modules(resumed.model)[0].A_shape[0] == 4
    assert torch.allclose(_logits(resumed.model, IDS), _logits(trainer.model, IDS), atol=1e-4)


@pytest.mark.slow
def test_rewarmup_scales_the_learning_rate_after_a_squeeze(tmp_path, tokenizer):
    seen: dict[int, tuple[float, float]] = {}

    class _LearningRates(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            used = unwrap_optimizer(optimizer).param_groups[0]["lr"]
            seen[state.global_step + 1] = (used, lr_scheduler.get_last_lr()[0])

    squeeze = InSqueezeCallback(target_rank=4, schedule=[(4, 4)], rewarmup_steps=3)
    _train(tmp_path, tokenizer, [squeeze, _LearningRates()], max_steps=9)
    ratios = {step: used / scheduled for step, (used, scheduled) in seen.items()}
    assert ratios[4] == pytest.approx(1.0)
    assert [ratios[step] for step in (5, 6, 7)] == pytest.approx([0.25, 0.5, 0.75])
    assert ratios[8] == pytest.approx(1.0) and ratios[9] == pytest.approx(1.0)


def test_schedules():
    assert plan_schedule(16, 4, "geometric", 20, 40) == {20: 8, 40: 4}
    assert plan_schedule(64, 8, "geometric", 10, 40) == {10: 32, 25: 16, 40: 8}
    assert plan_schedule(16, 8, "geometric", 20, 40) == {40: 8}
    linear = plan_schedule(16, 4, "linear", 20, 31)
    assert list(linear.values()) == list(range(15, 3, -1)) and list(linear) == list(range(20, 32))
    assert plan_schedule(16, 4, [(0.5, 8), (30, 4)], 0, 0, max_steps=40) == {20: 8, 30: 4}
    assert plan_schedule(4, 4, "geometric", 1, 2) == {}
    with pytest.raises(LoraMonitorError, match="schedule"):
        plan_schedule(16, 4, "cosine", 1, 2)
    with pytest.raises(LoraMonitorError, match="start_step"):
        resolve_step(1.5, 100, "start_step")
    with pytest.raises(LoraMonitorError, match="optimizer_state"):
        InSqueezeCallback(optimizer_state="keep")
    for bad_rank in (2.7, 0, -4, True, "4"):
        with pytest.raises(LoraMonitorError, match="target_rank"):
            InSqueezeCallback(target_rank=bad_rank)
    assert InSqueezeCallback(target_rank=4.0).target_rank == 4
    for bad_fraction in (0, 1.5, -0.1, "0.9"):
        with pytest.raises(LoraMonitorError, match="min_variance_retention"):
            InSqueezeCallback(min_variance_retention=bad_fraction)


def test_bad_callback_options_are_one_clear_error_naming_the_option():
    for options, option in (
        ({"method": "svd"}, "method"),
        ({"mode": "fast"}, "mode"),
        ({"rewarmup_steps": -1}, "rewarmup_steps"),
        ({"rewarmup_steps": 1.5}, "rewarmup_steps"),
        ({"rsvd_oversample": -2}, "rsvd_oversample"),
        ({"rsvd_power_iters": 0.5}, "rsvd_power_iters"),
    ):
        with pytest.raises(LoraMonitorError, match=f"InSqueezeCallback: {option}"):
            InSqueezeCallback(**options)


@pytest.mark.parametrize(
    "options, asked",
    [
        (dict(target_rank=16), "target_rank=16 is"),
        (dict(target_rank=8), "target_rank=8 is"),
        (dict(schedule=[(2, 8), (4, 12)]), r"every rank of schedule=\[\[2, 8\], \[4, 12\]\] is"),
    ],
)
def test_a_target_at_or_above_the_adapters_rank_stops_the_run_before_the_first_step(
    options, asked, tmp_path, tokenizer
):
    steps = []

    class _Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    model = peft_llama(r=8, init_lora_weights=True)
    args = training_args(tmp_path, max_steps=6)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=make_lm_dataset(tokenizer),
        callbacks=[InSqueezeCallback(**options), _Steps()],
    )
    message = rf"InSqueezeCallback: {asked} at or above the rank of every LoRA module .*largest: 8.*below 8"
    with pytest.raises(LoraMonitorError, match=message):
        trainer.train()
    assert steps == [] and trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "cosine"}, "schedule must be one of ('geometric', 'linear'), got 'cosine'"),
        ({"schedule": []}, "schedule must be one of"),
        ({"schedule": [(10, 4, 2)]}, "every schedule entry must be a (step, rank) pair"),
        ({"schedule": [(10, 2.5)]}, "every schedule rank must be a whole number, got 2.5"),
        ({"schedule": [(1.5, 4)]}, "every schedule step must be a step number"),
        ({"start_step": 0.8, "end_step": 0.2}, "end_step 0.2 comes before start_step 0.8"),
        ({"start_step": 40, "end_step": 20}, "end_step 20 comes before start_step 40"),
        ({"end_step": True}, "end_step must be a step number"),
    ],
)
def test_a_schedule_that_can_never_work_is_refused_when_the_callback_is_built(options, message):
    # Before training starts, not at on_train_begin: the callback's own arguments are checked in __init__.
    with pytest.raises(LoraMonitorError) as refused:
        InSqueezeCallback(target_rank=4, **options)
    assert str(refused.value).startswith("InSqueezeCallback: ") and message in str(refused.value)
    # plan_schedule, the function behind it, refuses the same schedules with the same message, named after
    # the name its caller passes as where
    if "schedule" in options:
        with pytest.raises(LoraMonitorError) as planned:
            plan_schedule(16, 4, options["schedule"], 1, 2, max_steps=10, where="InSqueezeCallback")
        assert str(planned.value) == str(refused.value)
        with pytest.raises(LoraMonitorError) as unnamed:
            plan_schedule(16, 4, options["schedule"], 1, 2, max_steps=10)
        assert str(unnamed.value) == str(refused.value).removeprefix("InSqueezeCallback: ")


@pytest.mark.slow
def test_works_in_trl_sft_trainer(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    squeeze = InSqueezeCallback(target_rank=4, schedule=[(3, 8), (6, 4)])
    audit = _OptimizerAudit()
    config = training_args(
        tmp_path,
        arguments_class=SFTConfig,
        max_steps=8,
        max_length=16,
        bf16=False,  # TRL's default autocasts the live forward on CPU; the reload check compares in fp32
    )
    trainer = SFTTrainer(
        model=peft_llama(r=16, init_lora_weights=True),
        args=config,
        train_dataset=make_lm_dataset(tokenizer),
        processing_class=tokenizer,
        callbacks=[squeeze, audit],
    )
    trainer.train()
    assert [event["step"] for event in squeeze.events] == [3, 6]
    assert set(current_ranks(trainer.model).values()) == {4}
    assert audit.mismatches == []
    squeeze_logs = [entry for entry in trainer.state.log_history if "in_squeeze/loss_jump" in entry]
    assert len(squeeze_logs) == 2
    assert not any("entropy" in entry for entry in squeeze_logs)  # TRL's own metric windows left alone
    _assert_reloads_same(trainer, tmp_path / "adapter")


@pytest.mark.slow
def test_trl_reference_adapter_is_never_squeezed(tmp_path, tokenizer):
    from peft import LoraConfig

    model = peft_llama(r=16, init_lora_weights=True)
    # GRPOTrainer keeps its reference policy as a frozen second adapter named "ref".
    model.add_adapter("ref", LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    reference = {r.name: (r.B.clone(), r.A.clone()) for r in find_lora_modules(model, "ref")}
    squeeze = InSqueezeCallback(target_rank=4, schedule=[(2, 4)])
    args = training_args(tmp_path, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=make_lm_dataset(tokenizer), callbacks=[squeeze])
    trainer.train()
    assert squeeze.adapter_name == "default"
    assert set(current_ranks(model, "default").values()) == {4}
    for record in find_lora_modules(model, "ref"):
        assert record.rank == 16
        assert torch.equal(record.B, reference[record.name][0]) and torch.equal(
            record.A, reference[record.name][1]
        )


@pytest.mark.parametrize("start, end", [(5.0, 0.7), (0.3, 40), (2, 8.0)])
def test_a_step_number_and_a_fraction_are_told_by_value_not_type(start, end):
    # 5.0 is step 5 and 0.7 is 70% of max_steps: they compare only once max_steps is known, so both are kept.
    callback = InSqueezeCallback(target_rank=4, start_step=start, end_step=end)
    assert (callback.options.start_step, callback.options.end_step) == (start, end)


@pytest.mark.parametrize(("scaling", "target", "found"), [("rank", 1, True), ("none", 8, False)])
def test_a_squeeze_that_undoes_training_is_reported_at_the_end(
    tmp_path, tokenizer, caplog, scaling, target, found
):
    # r=16 at 5e-3 learns (loss 4.87 → ~4.25 by step 15); one squeeze to rank 1 with lr_scaling="rank"
    # multiplies the step by 16, and the loss climbs back to ~4.8; a squeeze to 8 without scaling keeps falling.
    squeeze = InSqueezeCallback(target_rank=target, schedule=[(15, target)], lr_scaling=scaling)
    with caplog.at_level("WARNING", logger="lora_monitor"):
        trainer = _train(tmp_path, tokenizer, [squeeze], max_steps=30, lr_scheduler_type="constant")
    losses = _losses(trainer)
    reference = statistics.mean(losses[step] for step in range(6, 16))
    after = statistics.mean(losses[step] for step in range(16, 31))
    warnings = [
        r.getMessage() for r in caplog.records if "lost what the source had learned" in r.getMessage()
    ]
    if not found:
        assert squeeze.lost_progress is None and warnings == [] and after < reference
        return
    finding = squeeze.lost_progress
    assert finding is not None and (finding.first_squeeze_step, finding.last_squeeze_step) == (15, 15)
    # the Trainer's own logged losses (4 decimals) are the independent reference
    assert finding.reference_loss == pytest.approx(reference, abs=1e-4)
    assert finding.loss_after == pytest.approx(after, abs=1e-4)
    assert (finding.reference_steps, finding.steps_after) == (10, 15)
    assert finding.increase > 0.2
    assert warnings == [finding.message("InSqueezeCallback", "rank")]
    assert warnings[0].startswith(
        "InSqueezeCallback: the training loss after the last squeeze (step 15: mean "
    )
