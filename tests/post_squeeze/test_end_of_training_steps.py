"""The steps around :func:`squeeze_trained_adapter` that ``PostSqueezeCallback`` calls, checked without a
Trainer on a real PEFT model: the candidate ranks against the adapter, whether the rank by function will be
measured, the held-out batches from a real ``DataLoader``, and the variance table and run summary of the
result."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from tiny_models import SENTENCES, peft_llama
from torch.utils.data import DataLoader

from lora_monitor import LoraMonitorError
from lora_monitor.adapters import find_lora_modules
from lora_monitor.edit.edit import calibration_batches
from lora_monitor.post_squeeze import SqueezeOptions
from lora_monitor.post_squeeze.end_of_training import (
    check_by_function,
    check_candidate_ranks,
    function_is_measured,
    held_out_batches,
    squeeze_trained_adapter,
)
from lora_monitor.post_squeeze.manifest import TABLE_COLUMNS

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model():
    return peft_llama(r=8, lora_alpha=16, target_modules=TARGETS)


def test_a_candidate_rank_above_the_adapters_is_refused_with_the_callbacks_message():
    options = SqueezeOptions(candidate_ranks=[16, 4, 12], where="PostSqueezeCallback")
    with pytest.raises(LoraMonitorError) as raised:
        check_candidate_ranks(_model(), options)
    assert str(raised.value) == (
        "PostSqueezeCallback: candidate_ranks [4, 12, 16] holds 12, 16, above the adapter's largest rank 8: "
        "a compressed adapter has at most the directions it was trained with; give ranks up to 8"
    )
    with pytest.raises(LoraMonitorError, match=r"^candidate_ranks \[2, 9\] holds 9, above"):
        check_candidate_ranks(_model(), SqueezeOptions(candidate_ranks=[2, 9]))


def test_candidate_ranks_up_to_the_largest_module_rank_pass():
    # rank_pattern: one module type at 4, the largest stays 8; a rank of 8 is below that, not above.
    model = peft_llama(r=8, target_modules=TARGETS, rank_pattern={"q_proj": 4})
    assert sorted({record.rank for record in find_lora_modules(model)}) == [4, 8]
    check_candidate_ranks(model, SqueezeOptions(candidate_ranks=[2, 8]))
    check_candidate_ranks(model, SqueezeOptions())  # the default ranks are the adapter's own
    model.add_adapter("small", LoraConfig(r=4, target_modules=TARGETS))
    check_candidate_ranks(model, SqueezeOptions(candidate_ranks=[8]))  # the active adapter, at 8
    with pytest.raises(LoraMonitorError, match="largest rank 4"):  # the named one, at 4
        check_candidate_ranks(model, SqueezeOptions(candidate_ranks=[8]), adapter_name="small")


@pytest.mark.parametrize(
    ("by_function", "has_data", "measured"),
    [
        (True, True, True),
        ("auto", True, True),
        ("auto", False, False),
        (False, True, False),
        (False, False, False),
    ],
)
def test_the_rank_by_function_is_measured_when_asked_and_possible(by_function, has_data, measured):
    assert function_is_measured(by_function, has_data, _model(), None, "PostSqueezeCallback") is measured


def test_the_rank_by_function_asked_for_without_data_stops_before_training():
    with pytest.raises(LoraMonitorError) as raised:
        function_is_measured(True, False, _model(), None, "PostSqueezeCallback")
    assert str(raised.value) == (
        "PostSqueezeCallback(by_function=True) needs held-out data: give the Trainer an eval_dataset, or pass "
        "eval_batches"
    )


@pytest.mark.parametrize("wrong", ["yes", 1, 0, None])
def test_by_function_other_than_true_false_or_auto_is_refused(wrong):
    with pytest.raises(LoraMonitorError, match=r"^my_loop: by_function must be True, False or 'auto', got "):
        check_by_function(wrong, "my_loop")
    assert check_by_function("auto", "my_loop") == "auto" and check_by_function(False, "my_loop") is False


def test_given_batches_are_used_and_the_dataloader_is_never_built(tokenizer):
    batches = calibration_batches(SENTENCES[:4], tokenizer, batch_size=2, max_length=16)

    def no_loader():
        raise AssertionError("the dataloader was built although batches were given")

    assert held_out_batches(batches, no_loader)() is batches


def test_the_dataloader_is_built_when_asked_and_read_in_one_pass(tokenizer):
    batches = calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)
    built = []

    def loader():
        built.append(DataLoader(batches, batch_size=None))  # yields each batch as it is
        return built[-1]

    from_loader = held_out_batches(None, loader)
    assert built == []  # nothing is read before the rank by function asks for it
    gathered = from_loader()
    assert len(built) == 1 and len(gathered) == len(batches) == 2
    for got, want in zip(gathered, batches, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])


def test_the_rank_by_function_from_a_dataloader_is_the_one_from_the_batches(tokenizer, tmp_path):
    batches = calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)
    options = SqueezeOptions(candidate_ranks=[1, 2, 4, 8])
    model = _model()
    direct = squeeze_trained_adapter(model, tmp_path, options, eval_batches=lambda: batches, intruders=False)
    loaded = squeeze_trained_adapter(
        model,
        tmp_path,
        options,
        eval_batches=held_out_batches(None, lambda: DataLoader(batches, batch_size=None)),
        intruders=False,
    )
    assert loaded.function is not None and direct.function is not None
    assert loaded.function.recommended_rank == direct.function.recommended_rank
    assert loaded.function.full_loss == direct.function.full_loss
    assert {rank: e.loss for rank, e in loaded.function.evaluations.items()} == {
        rank: e.loss for rank, e in direct.function.evaluations.items()
    }


def test_the_variance_table_and_run_summary_follow_the_analysis(tokenizer, tmp_path):
    batches = calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)
    result = squeeze_trained_adapter(
        _model(), tmp_path, SqueezeOptions(candidate_ranks=[2, 4, 8]), eval_batches=lambda: batches
    )
    columns, rows = result.variance_table()
    assert columns == TABLE_COLUMNS
    assert [row[0] for row in rows] == [2, 4, 8]
    for row in rows:
        rank = row[0]
        assert row[1:5] == [
            result.analysis.mean_variance[rank],
            result.analysis.min_variance[rank],
            result.analysis.max_variance[rank],
            result.analysis.weighted_variance[rank],
        ]
        assert row[5] is (rank == result.analysis.recommended_rank)
    assert rows[-1][1] == pytest.approx(1.0)  # the full rank keeps all of every delta

    summary = result.run_summary()
    assert summary["squeeze/source_rank"] == 8
    assert summary["squeeze/num_modules"] == 3 * 2  # three module types in two layers
    assert summary["squeeze/min_variance_retention"] == 0.95
    assert summary["squeeze/intruder_dimensions"] == sum(record.count for record in result.intruders)
    assert len(result.intruders) == 6
    # The logged scalars are the run summary and the rank by function.
    assert result.scalars() == {
        **summary,
        "squeeze/function_recommended_rank": result.function.recommended_rank,
    }
