"""Rank advice by function: truncation on the live model against a dense float64 SVD reference."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import SENTENCES, peft_llama

from lora_monitor import LoraMonitorError, analyze_adapter
from lora_monitor.adapters import factor_parameters, find_lora_modules
from lora_monitor.edit.edit import calibration_batches
from lora_monitor.post_squeeze.held_out import recommend_rank_by_function

RANKS = [1, 2, 4, 8]


def float64_model():
    return peft_llama(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]).double()


def batches(tokenizer):
    return calibration_batches(SENTENCES[:8], tokenizer, batch_size=4, max_length=16)


def live_parameters(model):
    return [
        p
        for record in find_lora_modules(model)
        for p in factor_parameters(record.module, record.adapter_name)
    ]


def dense_truncation(model, rank, module_type=None):
    """A copy of ``model`` whose every pair (or every pair of ``module_type``) is the rank-``rank``
    truncation of the dense ``B@A`` (float64 SVD)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for record in find_lora_modules(reference):
            if module_type is not None and record.module_type != module_type:
                continue
            B_param, A_param = factor_parameters(record.module, record.adapter_name)
            U, S, Vh = torch.linalg.svd(B_param.double() @ A_param.double())
            root = S[:rank].sqrt()
            B_param.zero_()
            A_param.zero_()
            B_param[:, :rank] = U[:, :rank] * root
            A_param[:rank] = root[:, None] * Vh[:rank]
    return reference


def reference_numbers(model, truncated, data):
    """Row-weighted mean loss of ``truncated`` and its mean per-token KL from ``model``."""
    loss, rows, kl, tokens = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for batch in data:
            original, output = model(**batch), truncated(**batch)
            loss += float(output.loss) * batch["input_ids"].shape[0]
            rows += batch["input_ids"].shape[0]
            p = torch.log_softmax(original.logits, -1)[batch["attention_mask"].bool()]
            q = torch.log_softmax(output.logits, -1)[batch["attention_mask"].bool()]
            kl += float((p.exp() * (p - q)).sum())
            tokens += p.shape[0]
    return loss / rows, kl / tokens


@pytest.mark.slow
def test_full_rank_is_the_model_itself(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    own_loss, own_kl = reference_numbers(model, model, data)
    assert advice.full_loss == pytest.approx(own_loss, rel=1e-12)
    assert advice.evaluations[8].loss == pytest.approx(own_loss, rel=1e-10)
    assert abs(advice.evaluations[8].kl) < 1e-10 and own_kl == 0.0
    assert abs(advice.evaluations[8].loss_increase) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_truncation_matches_a_dense_svd_reference(tokenizer, rank):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    loss, kl = reference_numbers(model, dense_truncation(model, rank), data)
    evaluation = advice.evaluations[rank]
    assert kl > 1e-6  # the truncation changes the outputs, so the comparison below means something
    assert evaluation.loss == pytest.approx(loss, rel=1e-9)
    assert evaluation.kl == pytest.approx(kl, rel=1e-6)
    assert evaluation.loss_increase == pytest.approx(loss - advice.full_loss, rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_per_module_type_truncates_one_type_against_a_dense_reference(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, by_module_type=True, progress=False)
    assert set(advice.type_evaluations) == {"q_proj", "v_proj", "down_proj"}
    for kind in ("q_proj", "down_proj"):
        loss, kl = reference_numbers(model, dense_truncation(model, 1, kind), data)
        evaluation = advice.type_evaluations[kind][1]
        assert kl > 1e-8
        assert evaluation.loss == pytest.approx(loss, rel=1e-9)
        assert evaluation.kl == pytest.approx(kl, rel=1e-6)
        # the default rule per type: the share of what that type's directions beyond the first bring
        one, full = advice.type_evaluations[kind][1].loss, advice.full_loss
        kept = {
            r: (one - advice.type_evaluations[kind][r].loss) / (one - full) if one > full else 1.0
            for r in RANKS
        }
        assert all(advice.type_evaluations[kind][r].loss_retention == pytest.approx(kept[r]) for r in RANKS)
        within = [r for r in RANKS if kept[r] >= advice.min_loss_retention]
        assert advice.type_recommended_ranks[kind] == (within[0] if within else RANKS[-1])
    energy = analyze_adapter(model, candidate_ranks=RANKS)
    assert advice.energy_type_ranks == {k: g.recommended_rank for k, g in energy.by_module_type.items()}
    # the global evaluations are those of the call without by_module_type
    plain = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    assert all(
        plain.evaluations[r].loss == pytest.approx(advice.evaluations[r].loss, rel=1e-12) for r in RANKS
    )


def test_factors_are_bit_identical_and_in_place_after_the_call_and_after_an_error(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    model.train()
    before = [(p.data_ptr(), p.detach().clone()) for p in live_parameters(model)]
    recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    after = live_parameters(model)
    assert [p.data_ptr() for p in after] == [ptr for ptr, _ in before]
    assert all(torch.equal(p, old) for p, (_, old) in zip(after, before, strict=True))
    assert model.training

    unlabelled = [data[0], {key: value for key, value in data[1].items() if key != "labels"}]
    with pytest.raises(LoraMonitorError, match="labels"):
        recommend_rank_by_function(model, unlabelled, ranks=RANKS, progress=False)
    assert all(torch.equal(p, old) for p, (_, old) in zip(live_parameters(model), before, strict=True))
    assert model.training


@pytest.mark.slow
def test_recommendation_is_the_smallest_rank_within_tolerance(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    first = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    increases = {rank: e.relative_increase for rank, e in first.evaluations.items()}
    assert increases[1] > increases[8]  # rank 1 loses something: the tolerances below pick different ranks
    for tolerance in sorted({max(value, 0.0) for value in increases.values()} | {1e9}):
        advice = recommend_rank_by_function(model, data, ranks=RANKS, tolerance=tolerance, progress=False)
        within = [rank for rank in RANKS if advice.evaluations[rank].relative_increase <= tolerance]
        assert advice.recommended_rank == (within[0] if within else RANKS[-1])
    assert (
        recommend_rank_by_function(model, data, ranks=RANKS, tolerance=1e9, progress=False).recommended_rank
        == 1
    )
    energy = analyze_adapter(model, candidate_ranks=RANKS, min_variance_retention=0.9)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, min_variance_retention=0.9, progress=False)
    assert advice.energy_recommended_rank == energy.recommended_rank
    assert advice.to_dict()["recommended_rank"] == advice.recommended_rank


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"tolerance": -0.1}, "tolerance"), ({"ranks": [0]}, "rank"), ({"ranks": []}, "ranks is empty")],
)
def test_bad_options_name_the_option(tokenizer, arguments, message):
    with pytest.raises(LoraMonitorError, match=message):
        recommend_rank_by_function(float64_model(), batches(tokenizer), progress=False, **arguments)


def test_no_batches_is_an_error():
    with pytest.raises(LoraMonitorError, match="eval_batches is empty"):
        recommend_rank_by_function(float64_model(), [], progress=False)


# ---- issue 29, class 2: no advice from a loss over no token -----------------------------------------------


def test_evaluation_data_that_scores_no_token_is_refused_and_the_factors_are_untouched(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    before = [p.detach().clone() for p in live_parameters(model)]
    unlabelled = [{**batch, "labels": torch.full_like(batch["labels"], -100)} for batch in data]
    with pytest.raises(LoraMonitorError, match="eval_batches: no token is scored in 2 batch"):
        recommend_rank_by_function(model, unlabelled, ranks=RANKS, progress=False)
    # one-token texts in a causal LM: their only label has no position before it to be predicted from
    one_token = calibration_batches(["adapter", "rank", "the"], tokenizer, batch_size=1)
    assert all(batch["input_ids"].shape == (1, 1) for batch in one_token)
    with pytest.raises(LoraMonitorError, match="every text is a single token"):
        recommend_rank_by_function(model, one_token, ranks=RANKS, progress=False)
    assert all(torch.equal(p, old) for p, old in zip(live_parameters(model), before, strict=True))


@pytest.mark.slow
def test_one_token_texts_are_left_out_and_counted(tokenizer):
    # --batch-size 1 with a one-token text among the others: that batch's loss is NaN (a mean over no label),
    # and before issue 29 it made every loss NaN and the source rank "win".
    model = float64_model()
    texts = ["adapter", *SENTENCES[:3], "rank", SENTENCES[3]]
    data = calibration_batches(texts, tokenizer, batch_size=1, max_length=16)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, tolerance=1e9, progress=False)
    # the same numbers as on the multi-token texts alone, computed independently
    kept = [batch for batch in data if batch["input_ids"].shape[1] > 1]
    assert len(kept) == 4
    own_loss, _ = reference_numbers(model, model, kept)
    assert advice.full_loss == pytest.approx(own_loss, rel=1e-12)
    loss, kl = reference_numbers(model, dense_truncation(model, 1), kept)
    assert advice.evaluations[1].loss == pytest.approx(loss, rel=1e-9)
    assert advice.evaluations[1].kl == pytest.approx(kl, rel=1e-6)
    assert advice.recommended_rank == 1  # tolerance 1e9: the smallest rank, not the NaN-driven largest
    assert advice.unscored_texts == 2
    assert advice.scored_tokens == sum(len(tokenizer(text)["input_ids"]) - 1 for text in SENTENCES[:4])
    assert advice.to_dict()["unscored_texts"] == 2


def test_a_nan_loss_of_the_uncompressed_model_is_refused(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    with torch.no_grad():  # a base weight (the factors are checked on their own): the loss itself is NaN
        model.get_base_model().lm_head.weight[3, 0] = float("nan")
    with pytest.raises(LoraMonitorError, match="eval_batches: the loss of batch 0 is nan"):
        recommend_rank_by_function(model, data, ranks=RANKS, progress=False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_variance_retention": 1.5}, "min_variance_retention must be above 0 and at most 1, got 1.5"),
        ({"min_variance_retention": float("nan")}, "min_variance_retention must be a finite number"),
    ],
)
def test_the_min_variance_retention_is_checked_by_its_own_name(tokenizer, arguments, message):
    with pytest.raises(LoraMonitorError, match=message):
        recommend_rank_by_function(float64_model(), batches(tokenizer), progress=False, **arguments)


def test_an_adapter_outside_the_forward_pass_is_refused_not_given_rank_1(tokenizer):
    # Truncating an adapter the forward pass does not use changes no loss: every rank would "keep" it.
    from peft import LoraConfig

    data = batches(tokenizer)
    model = float64_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with pytest.raises(
        LoraMonitorError, match=r"adapter 'other' is not active in module .*set_adapter\('other'\)"
    ):
        recommend_rank_by_function(model, data, adapter_name="other")
    with model.disable_adapter(), pytest.raises(LoraMonitorError, match="adapters of the model are disabled"):
        recommend_rank_by_function(model, data)
    model.merge_adapter()
    with pytest.raises(
        LoraMonitorError, match=r"adapter 'default' is merged into its base weight .*unmerge_adapter"
    ):
        recommend_rank_by_function(model, data)
    model.unmerge_adapter()
    assert recommend_rank_by_function(model, data).adapter_gain != 0.0  # the active adapter, measured
