"""The lost-progress check of In-Squeeze: the training loss after the last squeeze against just before the first."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor.in_squeeze.loss_probe import LossProbe
from lora_monitor.in_squeeze.lost_progress import MIN_STEPS, REFERENCE_STEPS, SIGNIFICANCE, LostProgressWatch

# Per-step training losses of two MiniLM runs of bench/in_squeeze_diagnosis.py (lora_alpha=16, 2e-3, squeezes
# 64→8 at steps 36, 60 and 84): with lr_scaling="rank" the run fell back to the majority class (58.6% test);
# with "sqrt" it reached 78.15%. Steps 27-36 (the reference) and 85-120, rounded to 3 decimals.
COLLAPSED = {
    "reference": [0.656, 0.689, 0.703, 0.604, 0.647, 0.687, 0.675, 0.635, 0.612, 0.462],
    "after": [0.655, 0.652, 0.666, 0.634, 0.815, 0.72, 0.637, 0.752, 0.613, 0.665, 0.802, 0.686, 0.732, 0.677,
              0.662, 0.704, 0.698, 0.688, 0.694, 0.697, 0.686, 0.678, 0.682, 0.688, 0.683, 0.705, 0.709, 0.683,
              0.695, 0.701, 0.683, 0.689, 0.68, 0.687, 0.693, 0.671],
}  # fmt: skip
HEALTHY = {
    "reference": COLLAPSED["reference"],  # the same run until the first squeeze
    "after": [0.412, 0.584, 0.516, 0.475, 0.675, 0.494, 0.441, 0.561, 0.369, 0.441, 0.528, 0.595, 0.481, 0.438,
              0.697, 0.396, 0.387, 0.538, 0.431, 0.69, 0.583, 0.407, 0.43, 0.344, 0.572, 0.536, 0.937, 0.55,
              0.546, 0.42, 0.541, 0.384, 0.611, 0.607, 0.303, 0.499],
}  # fmt: skip


def watched(losses: dict[str, list[float]], squeezes=(36, 60, 84)) -> LostProgressWatch:
    """A watch fed ``losses``: some steps from the start, the reference just before the first squeeze, the
    squeezes, and the steps after the last one (steps between the squeezes are fed a constant)."""
    watch = LostProgressWatch()
    first, last = squeezes[0], squeezes[-1]
    step = 0
    for loss in [0.7] * (first - len(losses["reference"])) + losses["reference"]:
        step += 1
        watch.record_loss(loss)
        watch.step_end(step, squeezed=step in squeezes)
    while step < last:
        step += 1
        watch.record_loss(0.6)
        watch.step_end(step, squeezed=step in squeezes)
    for loss in losses["after"]:
        step += 1
        watch.record_loss(loss)
        watch.step_end(step, squeezed=False)
    return watch


def z_score(reference: list[float], after: list[float]) -> float:
    """The independent reference: the difference of the means over its standard error (two samples)."""
    error = math.sqrt(
        statistics.variance(reference) / len(reference) + statistics.variance(after) / len(after)
    )
    return (statistics.mean(after) - statistics.mean(reference)) / error


def test_the_collapsed_run_is_found_and_the_healthy_one_is_not():
    collapsed = watched(COLLAPSED).finding()
    assert collapsed is not None
    assert collapsed.reference_loss == pytest.approx(statistics.mean(COLLAPSED["reference"]))
    assert collapsed.loss_after == pytest.approx(statistics.mean(COLLAPSED["after"]))
    assert collapsed.reference_steps == REFERENCE_STEPS and collapsed.steps_after == len(COLLAPSED["after"])
    assert (collapsed.first_squeeze_step, collapsed.last_squeeze_step) == (36, 84)
    assert collapsed.increase / collapsed.standard_error == pytest.approx(
        z_score(COLLAPSED["reference"], COLLAPSED["after"]), rel=1e-6
    )
    assert z_score(COLLAPSED["reference"], COLLAPSED["after"]) > SIGNIFICANCE
    message = collapsed.message("InSqueezeCallback", "rank")
    assert message.startswith("InSqueezeCallback: the training loss after the last squeeze (step 84: mean ")
    assert "lr_scaling='sqrt'" in message and "target_rank" in message
    assert watched(HEALTHY).finding() is None
    assert z_score(HEALTHY["reference"], HEALTHY["after"]) < 0
    # the comparison behind the verdict is there for a run that kept its progress too (bench tables print it)
    kept = watched(HEALTHY).comparison()
    assert kept.increase / kept.standard_error == pytest.approx(
        z_score(HEALTHY["reference"], HEALTHY["after"]), rel=1e-6
    )
    assert watched(COLLAPSED).comparison() == collapsed


def test_a_rise_within_the_noise_says_nothing():
    # the same noise as the reference, shifted up by less than 2 standard errors
    reference = COLLAPSED["reference"]
    shift = 0.5 * math.sqrt(2 * statistics.variance(reference) / len(reference))
    noisy = {"reference": reference, "after": [x + shift for x in reference]}
    assert 0 < z_score(noisy["reference"], noisy["after"]) < SIGNIFICANCE
    assert watched(noisy).finding() is None


def test_too_few_steps_on_either_side_give_no_verdict():
    short_after = {"reference": COLLAPSED["reference"], "after": [5.0] * (MIN_STEPS - 1)}
    assert watched(short_after).finding() is None
    assert watched({**short_after, "after": [5.0] * MIN_STEPS}).finding() is not None
    # a first squeeze at step 3 leaves 3 reference steps
    early = {"reference": [0.7, 0.6, 0.5], "after": [5.0] * 20}
    assert watched(early, squeezes=(3, 6)).finding() is None
    assert LostProgressWatch().finding() is None  # no squeeze at all
    assert watched(short_after).comparison() is None and LostProgressWatch().comparison() is None


def test_a_loss_that_blows_up_after_a_squeeze_is_found():
    blown = {"reference": COLLAPSED["reference"], "after": [0.7] * 10 + [math.nan] * 10}
    finding = watched(blown).finding()
    assert finding is not None and math.isinf(finding.loss_after)
    assert "became NaN/Inf after the squeeze at step 84" in finding.message("InSqueezeCallback", "rank")


def test_state_round_trip_mid_run_reaches_the_same_verdict():
    whole = watched(COLLAPSED)
    resumed = LostProgressWatch()
    halfway = watched({"reference": COLLAPSED["reference"], "after": COLLAPSED["after"][:12]})
    resumed.load_state(halfway.state())
    for loss in COLLAPSED["after"][12:]:
        resumed.record_loss(loss)
        resumed.step_end(0, squeezed=False)
    assert resumed.finding() == whole.finding()
    assert len(str(whole.state())) < 600  # a dozen numbers, whatever the length of the run


def test_the_hook_reads_training_forward_passes_only():
    model = peft_llama(0)
    watch, probe = LostProgressWatch(), LossProbe()
    watch.attach(model)
    probe.attach(model)
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.randint(0, 100, (2, 8))}
    model.train()
    expected = [model(**batch).loss.item(), model(**batch).loss.item()]  # two micro-batches of one step
    probe.loss(model)  # the probe's eval-mode pass is not a training loss
    model.eval()
    with torch.no_grad():
        model(**batch)  # an evaluation pass is not either
    model.train()
    model(input_ids=batch["input_ids"])  # no labels: no loss to read
    watch.step_end(1, squeezed=True)
    assert watch.reference == [pytest.approx(sum(expected) / 2)]
    watch.detach()
    model(**batch)
    watch.step_end(2, squeezed=False)
    assert watch.state()["after"] == [0, 0.0, 0.0]
