"""The default rank by function: the smallest rank that keeps 95% of the held-out loss reduction the directions
beyond the first bring. Retentions are checked against losses of dense float64 SVD truncations
(``dense_truncation``); the standard errors of each rank's loss increase against a float64 cross-entropy (or
squared error) of the model's logits on each row run alone; the adapter's gain against the model with its
pairs zeroed."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from test_squeeze_function import RANKS, batches, dense_truncation, float64_model, reference_numbers
from tiny_models import SENTENCES, tiny_llama

from lora_monitor.post_squeeze.held_out import DEFAULT_LOSS_RETENTION, recommend_rank_by_function


def rows_of(data):
    """Every row of every batch as a batch of its own (its padding kept: the loss ignores it)."""
    return [
        {key: value[i : i + 1] for key, value in batch.items()}
        for batch in data
        for i in range(len(batch["labels"]))
    ]


def row_loss(model, row, kind: str) -> float:
    """The loss of one row in float64 from the model's logits (the model's own loss is float32)."""
    logits, labels = model(**row).logits.double(), row["labels"]
    if kind == "regression":
        return float((logits.reshape(-1) - labels.double()).square().mean())
    if kind == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))


def reference_standard_error(model, truncated, data, kind: str) -> float:
    """SE of the per-row loss differences, each row run alone through both models."""
    with torch.no_grad():
        differences = [row_loss(truncated, row, kind) - row_loss(model, row, kind) for row in rows_of(data)]
    return statistics.stdev(differences) / math.sqrt(len(differences))


def smallest_keeping(advice, share: float = DEFAULT_LOSS_RETENTION) -> int:
    """The default rule, written out: the smallest rank keeping ``share``."""
    within = [rank for rank in advice.ranks if advice.evaluations[rank].loss_retention >= share]
    return within[0] if within else advice.ranks[-1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 4])
def test_the_standard_error_of_a_causal_lm_matches_its_rows_run_alone(tokenizer, rank):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    expected = reference_standard_error(model, dense_truncation(model, rank), data, "causal")
    assert expected > 1e-6  # the rows differ, so the comparison means something
    assert advice.evaluations[rank].increase_se == pytest.approx(expected, rel=1e-9)
    assert advice.scored_rows == 8


def classifier(kind: str):
    """A tiny float64 Llama classifier (two labels, one regression output, or token labels) with LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

    config = tiny_llama().config
    config.num_labels = 1 if kind == "regression" else 2
    torch.manual_seed(0)
    head = LlamaForTokenClassification if kind == "token" else LlamaForSequenceClassification
    base = head(config).double()
    task = "TOKEN_CLS" if kind == "token" else "SEQ_CLS"
    torch.manual_seed(1)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task
    )
    return get_peft_model(base, lora).eval()


def labelled(kind: str, tokenizer):
    texts = SENTENCES[:12]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(3)
    if kind == "regression":
        labels = torch.randn(len(texts), generator=generator, dtype=torch.float64)
    elif kind == "token":
        labels = torch.randint(0, 2, encoded["input_ids"].shape, generator=generator)
        labels[encoded["attention_mask"] == 0] = -100
    else:
        labels = torch.randint(0, 2, (len(texts),), generator=generator)
    return [
        {
            "input_ids": encoded["input_ids"][i : i + 4],
            "attention_mask": encoded["attention_mask"][i : i + 4],
            "labels": labels[i : i + 4],
        }
        for i in range(0, len(texts), 4)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single_label", "regression", "token"])
def test_the_standard_error_of_a_classifier_matches_its_rows_run_alone(tokenizer, kind):
    model, data = classifier(kind), labelled(kind, tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    expected = reference_standard_error(model, dense_truncation(model, 2), data, kind)
    assert expected > 1e-8
    assert advice.evaluations[2].increase_se == pytest.approx(expected, rel=1e-9)
    assert advice.scored_rows == 12
    assert advice.recommended_rank == smallest_keeping(advice)


@pytest.mark.slow
def test_the_default_keeps_95_percent_of_what_the_directions_beyond_the_first_bring(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    assert advice.rule == "retention" and advice.min_loss_retention == 0.95
    # the retention of each rank from the losses of dense truncations, computed independently
    full, _ = reference_numbers(model, model, data)
    one, _ = reference_numbers(model, dense_truncation(model, 1), data)
    assert one - full > 1e-3  # rank 1 loses something, so the shares below mean something
    for rank in RANKS:
        loss, _ = reference_numbers(model, dense_truncation(model, rank), data)
        assert advice.evaluations[rank].loss_retention == pytest.approx((one - loss) / (one - full), rel=1e-6)
    assert advice.recommended_rank == advice.rank_by_retention == smallest_keeping(advice)
    assert advice.rank_one_loss == pytest.approx(one, rel=1e-9)
    # every retention as the threshold picks the rank that reaches it first
    for share in sorted({min(max(e.loss_retention, 1e-3), 1.0) for e in advice.evaluations.values()}):
        chosen = recommend_rank_by_function(
            model, data, ranks=RANKS, min_loss_retention=share, progress=False
        )
        assert chosen.recommended_rank == smallest_keeping(chosen, share)
    within = [rank for rank in RANKS if advice.evaluations[rank].relative_increase <= 0.01]
    assert advice.rank_within_tolerance == (within[0] if within else RANKS[-1])
    saved = advice.to_dict()
    assert saved["rule"] == "retention" and saved["min_loss_retention"] == 0.95
    assert saved["rank_by_retention"] == advice.recommended_rank and saved["scored_rows"] == 8
    assert saved["evaluations"][1]["increase_se"] == advice.evaluations[1].increase_se
    # a tolerance asks for the relative rule, and says so
    relative = recommend_rank_by_function(model, data, ranks=RANKS, tolerance=0.01, progress=False)
    assert relative.rule == "tolerance"
    assert relative.recommended_rank == relative.rank_within_tolerance == advice.rank_within_tolerance


@pytest.mark.slow
def test_rank_1_is_measured_when_it_is_not_a_candidate(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=[2, 4, 8], progress=False)
    assert sorted(advice.evaluations) == [2, 4, 8]
    one, _ = reference_numbers(model, dense_truncation(model, 1), data)
    assert advice.rank_one_loss == pytest.approx(one, rel=1e-9)
    every = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    for rank in (2, 4, 8):
        assert advice.evaluations[rank].loss_retention == pytest.approx(
            every.evaluations[rank].loss_retention
        )


@pytest.mark.slow
def test_when_rank_1_is_as_good_as_the_full_adapter_rank_1_is_recommended(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    # labels that rank 1 predicts: the directions beyond the first only lose on them
    rank_one = dense_truncation(model, 1)
    with torch.no_grad():
        relabelled = []
        for batch in data:
            predicted = rank_one(**batch).logits.argmax(-1)
            labels = torch.cat(
                [batch["labels"][:, :1], predicted[:, :-1]], dim=1
            )  # label t+1 from position t
            relabelled.append({**batch, "labels": labels.masked_fill(batch["attention_mask"] == 0, -100)})
    advice = recommend_rank_by_function(model, relabelled, ranks=RANKS, progress=False)
    assert advice.rank_one_loss < advice.full_loss
    assert all(e.loss_retention == 1.0 for e in advice.evaluations.values())
    assert advice.recommended_rank == 1


def zeroed_copy(model):
    """A copy of ``model`` with every LoRA B zeroed (anything else trained, such as a head, kept)."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in zeroed.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    return zeroed


def mean_row_loss(model, data, kind: str) -> float:
    with torch.no_grad():
        return statistics.fmean(row_loss(model, row, kind) for row in rows_of(data))


@pytest.mark.slow
def test_the_adapter_gain_is_measured_against_the_base_model(tokenizer):
    model, data = float64_model(), batches(tokenizer)
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    with model.disable_adapter():  # PEFT's own switch: the base model alone
        base, _ = reference_numbers(model, model, data)
    assert advice.base_loss == pytest.approx(base, rel=1e-6)
    assert advice.adapter_gain == pytest.approx(base - advice.full_loss, rel=1e-6)
    expected = reference_standard_error(model, zeroed_copy(model), data, "causal")
    assert advice.adapter_gain_se == pytest.approx(expected, rel=1e-9)
    assert advice.to_dict()["adapter_gain"] == advice.adapter_gain


@pytest.mark.slow
def test_a_classifier_keeps_its_trained_head_when_its_pairs_are_zeroed(tokenizer):
    model, data = classifier("single_label"), labelled("single_label", tokenizer)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)  # a head unlike the base's
    advice = recommend_rank_by_function(model, data, ranks=RANKS, progress=False)
    zeroed = zeroed_copy(model)
    assert advice.base_loss == pytest.approx(mean_row_loss(zeroed, data, "single_label"), rel=1e-9)
    with model.disable_adapter():  # the base model's own head: another number
        assert abs(mean_row_loss(model, data, "single_label") - advice.base_loss) > 1e-3
