"""The names Post-Squeeze had before issue 30 still work for a release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import peft_llama

import lora_monitor
import lora_monitor.post_squeeze as post_squeeze
import lora_monitor.render.console as console
import lora_monitor.squeeze as old_package
from lora_monitor.callbacks import PostSqueezeCallback
from lora_monitor.errors import LoraMonitorError

# old name in lora_monitor.squeeze -> the object it is now
MOVED = {
    "BudgetAllocation": (post_squeeze, "BudgetRanks"),
    "allocate_by_energy": (post_squeeze, "budget_ranks_by_energy"),
    "allocate_by_sensitivity": (post_squeeze, "budget_ranks_by_sensitivity"),
    "default_target_ranks": (post_squeeze, "default_candidate_ranks"),
    "print_analysis": (console, "print_analysis"),
    "squeeze_table": (console, "squeeze_table"),
    "summary_lines": (console, "summary_lines"),
    **{
        name: (post_squeeze, name)
        for name in (
            "DEFAULT_THRESHOLD",
            "DEFAULT_TOLERANCE",
            "CompressionResult",
            "EndOfTraining",
            "FunctionRecommendation",
            "GroupRecommendation",
            "ModuleSqueeze",
            "RankEvaluation",
            "SqueezeAnalysis",
            "SqueezeOptions",
            "analyze_adapter",
            "compress_adapter",
            "gather_adapter",
            "manifest_entry",
            "parameters_per_rank",
            "read_squeeze_toml",
            "recommend_rank_by_function",
            "squeeze_trained_adapter",
            "uniform_budget",
            "validate_rank",
            "validate_ranks",
            "validate_threshold",
            "validate_tolerance",
            "write_squeeze_manifest",
        )
    },
}


@pytest.fixture()
def folder(tmp_path):
    peft_llama(0).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_name_of_the_old_package_warns_and_is_the_new_one(old):
    home, new = MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"lora_monitor\.squeeze\.{old} is deprecated.*{new}"):
        value = getattr(old_package, old)
    assert value is getattr(home, new)


def test_the_old_package_lists_what_it_had_and_the_public_api_moved():
    assert sorted(old_package.__all__) == sorted(MOVED)
    for name in ("SqueezeAnalysis", "analyze_adapter", "compress_adapter", "recommend_rank_by_function"):
        assert getattr(lora_monitor, name) is getattr(post_squeeze, name)
    assert importlib.import_module("lora_monitor.post_squeeze.held_out").recommend_rank_by_function is (
        post_squeeze.recommend_rank_by_function
    )


def test_old_keywords_warn_and_mean_the_new_ones(tmp_path, folder):
    with pytest.warns(DeprecationWarning, match=r"analyze_adapter\(target_ranks=\.\.\.\) is deprecated"):
        analysis = post_squeeze.analyze_adapter(folder, target_ranks=[2, 4])
    assert analysis.candidate_ranks == [2, 4]
    with pytest.warns(DeprecationWarning, match="SqueezeAnalysis.target_ranks is deprecated"):
        assert analysis.target_ranks == [2, 4]
    with pytest.warns(DeprecationWarning, match=r"compress_adapter\(target_ranks=\.\.\.\)"):
        result = post_squeeze.compress_adapter(
            folder, tmp_path / "out", target_ranks=[2, 4], min_variance_retention=0.5
        )
    assert result.analysis.candidate_ranks == [2, 4]
    with pytest.warns(DeprecationWarning, match=r"SqueezeOptions\(target_ranks=\.\.\.\)"):
        assert post_squeeze.SqueezeOptions(target_ranks=[4, 2]).candidate_ranks == (2, 4)
    with pytest.warns(DeprecationWarning, match=r"PostSqueezeCallback\(target_ranks=\.\.\.\)"):
        assert PostSqueezeCallback(target_ranks=[4]).options.candidate_ranks == (4,)
    with pytest.warns(DeprecationWarning, match="t.toml: target_ranks is deprecated"):
        options = post_squeeze.SqueezeOptions.from_mapping({"target_ranks": [8, 2]}, "t.toml")
    assert options.candidate_ranks == (2, 8)
    with pytest.raises(
        LoraMonitorError, match=r"give candidate_ranks \(the new name of target_ranks\), not both"
    ):
        post_squeeze.analyze_adapter(folder, target_ranks=[2], candidate_ranks=[2])


def test_squeeze_model_target_ranks_is_new_ranks():
    from lora_monitor import current_ranks, squeeze_model

    model = peft_llama(0)
    with pytest.warns(
        DeprecationWarning, match=r"squeeze_model\(target_ranks=\.\.\.\) is deprecated.*new_ranks"
    ):
        squeeze_model(model, target_ranks=4)
    assert set(current_ranks(model).values()) == {4}


def test_energy_threshold_is_min_variance_retention():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    with pytest.warns(DeprecationWarning, match=r"recommend_rank_by_function\(energy_threshold=\.\.\.\)"):
        advice = post_squeeze.recommend_rank_by_function(
            peft_llama(0), batches, ranks=[2, 8], energy_threshold=0.5, progress=False
        )
    assert advice.min_variance_retention == 0.5
    with pytest.warns(DeprecationWarning, match="FunctionRecommendation.energy_threshold is deprecated"):
        assert advice.energy_threshold == 0.5
    assert advice.to_dict()["energy_threshold"] == 0.5  # the file's key is unchanged
