"""Rank advice by function: what truncating a live adapter to each rank does to held-out loss and outputs.

The energy table (:func:`~lora_monitor.post_squeeze.analysis.analyze_adapter`) says how much of ``‖ΔW‖²`` a rank
keeps; it does not say what the model loses. Here every candidate rank is tried on the live model itself:
each LoRA pair is replaced by its best rank-``k`` factors (:func:`lora_monitor.spectrum.truncate_factors`),
written into the existing parameters zero-padded to their shape (nothing is reallocated, written to disk or
reloaded), the evaluation batches are run, and the original tensors are copied back bit for bit at the end,
whatever happens. Cost: one forward pass over the evaluation batches per candidate rank, plus one for the
uncompressed model.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._deprecation import renamed_keywords
from .._io import json_safe
from ..adapters import check_in_forward, factor_parameters, find_lora_modules, unwrap_model
from ..adapters.factors import as_A_matrix, as_B_matrix, live_factors
from ..edit.data import IGNORED_LABEL, check_scored, finite_loss, is_causal_lm, scored_rows
from ..errors import LoraMonitorError
from ..spectrum import decomposition_dtype, truncate_factors
from .analysis import ALL_ZERO, SqueezeAnalysis, analyze_adapter
from .options import (
    DEFAULT_LOSS_RETENTION,
    DEFAULT_THRESHOLD,
    check_ranks_within,
    default_candidate_ranks,
    validate_rank,
    validate_threshold,
    validate_tolerance,
)

# The relative loss increase a rank may cost when a ``tolerance`` is asked for instead (0.01 = 1%).
DEFAULT_TOLERANCE = 0.01


@dataclass
class RankEvaluation:
    """The model with every LoRA pair truncated to ``rank``, on the evaluation batches."""

    rank: int
    loss: float  # mean held-out loss (batches weighted by their rows with a scored token); NaN: it broke
    loss_increase: float  # loss minus the uncompressed model's loss
    relative_increase: float  # loss_increase over the uncompressed model's loss (NaN: never within)
    kl: float  # mean KL(uncompressed ‖ truncated) of the output distributions, per scored position
    # Standard error of the mean per-row loss difference (truncated minus uncompressed, paired on each scored
    # row); NaN with fewer than two scored rows.
    increase_se: float = math.nan
    # (loss(1) - loss) / (loss(1) - full loss): the share of what the directions beyond the first bring that
    # this rank keeps (1 when rank 1 is already as good as the full adapter; NaN: the loss broke)
    loss_retention: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self.__dict__)


@dataclass
class FunctionRecommendation:
    """Held-out loss and output divergence at each candidate rank, and the rank they recommend.

    ``recommended_rank`` follows ``rule``:

    - ``"retention"`` (the default): the smallest rank whose ``loss_retention`` is at least
      ``min_loss_retention``: it keeps that share of the loss reduction that the directions beyond the first
      bring, ``(loss(1) - loss(k)) / (loss(1) - loss(full))`` (1 at every rank when rank 1 is already as good
      as the full adapter); ``rank_by_retention``. Each rank's ``increase_se`` says whether the held-out
      rows resolve its loss; it is printed, not part of the rule (a loss a small evaluation set does not
      resolve can still be real: see ``bench/EVIDENCE.md``);
    - ``"tolerance"`` (a ``tolerance`` was given): the smallest rank whose relative loss increase is at most
      ``tolerance``; ``rank_within_tolerance``.

    Either is the largest candidate when no rank qualifies. ``scored_tokens`` is how many labels the losses were averaged over;
    ``unscored_texts`` the rows left out because they score none (a one-token text in a causal LM).
    ``energy_recommended_rank`` is the energy table's advice at
    ``min_variance_retention`` for the same adapter, shown alongside (None when no candidate reaches it).

    With ``by_module_type``, the same per module type: ``type_evaluations[type][rank]`` truncates only the
    modules of that type (every other module keeps its full rank), ``type_recommended_ranks`` is the
    smallest rank within tolerance for each type and ``energy_type_ranks`` the energy table's advice for it.
    """

    full_loss: float
    tolerance: float
    ranks: list[int]
    evaluations: dict[int, RankEvaluation]
    recommended_rank: int
    min_variance_retention: float
    energy_recommended_rank: int | None
    retained_variance: dict[int, float] = field(default_factory=dict)  # mean over modules, from the table
    type_evaluations: dict[str, dict[int, RankEvaluation]] = field(default_factory=dict)
    type_recommended_ranks: dict[str, int] = field(default_factory=dict)
    energy_type_ranks: dict[str, int | None] = field(default_factory=dict)
    scored_tokens: int = 0
    unscored_texts: int = 0
    rule: str = "tolerance"
    min_loss_retention: float = DEFAULT_LOSS_RETENTION
    rank_by_retention: int | None = None
    rank_within_tolerance: int | None = None
    rank_one_loss: float = math.nan  # loss(1), the reference of the retention
    scored_rows: int = 0
    # The loss with every LoRA pair of the adapter zeroed (the base model, and whatever else was trained, such
    # as a classifier's head), and what the adapter gained: base_loss - full_loss (± its paired SE).
    base_loss: float = math.nan
    adapter_gain: float = math.nan
    adapter_gain_se: float = math.nan

    @property
    def rule_text(self) -> str:
        """What the recommended rank satisfies, as a clause after "the smallest rank" (for a summary line)."""
        if self.rule == "retention":
            return (
                f"that keeps {self.min_loss_retention:.0%} of the held-out loss reduction the directions beyond the "
                "first bring"
            )
        return f"whose held-out loss rises less than {self.tolerance:.0%}"

    @property
    def energy_threshold(self) -> float:
        """Deprecated name of :attr:`min_variance_retention`."""
        warnings.warn(
            "FunctionRecommendation.energy_threshold is deprecated: use min_variance_retention",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.min_variance_retention

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "full_loss": self.full_loss,
                "scored_tokens": self.scored_tokens,
                "scored_rows": self.scored_rows,
                "base_loss": self.base_loss,
                "adapter_gain": self.adapter_gain,
                "adapter_gain_se": self.adapter_gain_se,
                "unscored_texts": self.unscored_texts,
                "tolerance": self.tolerance,
                "ranks": self.ranks,
                "evaluations": {rank: e.to_dict() for rank, e in self.evaluations.items()},
                "recommended_rank": self.recommended_rank,
                "rule": self.rule,
                "min_loss_retention": self.min_loss_retention,
                "rank_by_retention": self.rank_by_retention,
                "rank_one_loss": self.rank_one_loss,
                "rank_within_tolerance": self.rank_within_tolerance,
                "energy_threshold": self.min_variance_retention,  # the manifest's key, unchanged
                "energy_recommended_rank": self.energy_recommended_rank,
                "retained_variance": self.retained_variance,
                "type_evaluations": {
                    kind: {rank: e.to_dict() for rank, e in by_rank.items()}
                    for kind, by_rank in self.type_evaluations.items()
                },
                "type_recommended_ranks": self.type_recommended_ranks,
                "energy_type_ranks": self.energy_type_ranks,
            }
        )


@dataclass
class _Pair:
    module_type: str
    B_param: torch.nn.Parameter
    A_param: torch.nn.Parameter
    original_B: torch.Tensor
    original_A: torch.Tensor
    truncated: dict[int, tuple[torch.Tensor, torch.Tensor]]  # rank -> (B_k, A_k), compact


def _pairs(model: torch.nn.Module, adapter_name: str | None, ranks: list[int]) -> list[_Pair]:
    pairs = []
    for record in find_lora_modules(model, adapter_name):
        B_param, A_param = factor_parameters(record.module, record.adapter_name)
        B, A = live_factors(record.module, record.adapter_name)  # a mask's kept directions only
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise LoraMonitorError(f"module {record.name}: its LoRA factors hold NaN or Inf")
        truncated = {}
        for rank in ranks:
            # the precision compress writes at, so that the rank judged here is the adapter it writes
            result = truncate_factors(B, A, rank, dtype=decomposition_dtype(B.dtype, A.dtype))
            truncated[rank] = (result.B, result.A)
        pairs.append(
            _Pair(
                record.module_type,
                B_param,
                A_param,
                B_param.detach().clone(),
                A_param.detach().clone(),
                truncated,
            )
        )
    return pairs


@torch.no_grad()
def _write(pair: _Pair, rank: int) -> None:
    """Pair truncated to ``rank``, zero-padded into the live parameters (their storage, their shape); rank 0:
    the pair zeroed (the base model's own output)."""
    B_view, A_view = as_B_matrix(pair.B_param.data), as_A_matrix(pair.A_param.data)
    B_view.zero_()
    A_view.zero_()
    if rank == 0:
        return
    new_B, new_A = pair.truncated[rank]
    B_view[:, : new_B.shape[1]].copy_(new_B)
    A_view[: new_A.shape[0]].copy_(new_A)


@torch.no_grad()
def _restore(pairs: list[_Pair]) -> None:
    for pair in pairs:
        pair.B_param.data.copy_(pair.original_B)
        pair.A_param.data.copy_(pair.original_A)


def _scored_log_probs(log_probs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Log-probabilities of the positions that count: every row of a classifier, real tokens of a sequence."""
    if log_probs.dim() == 2:
        return log_probs
    mask = batch.get("attention_mask")
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).to(flat.device).bool()]


def _row_losses(
    logits: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Each row's own loss, as the model's loss computes it (float64): the cross-entropy of a classifier's
    row, the mean over a sequence's scored tokens (label ``t + 1`` from position ``t`` in a causal LM), the
    squared error of a regression. NaN for a row that scores nothing."""
    labels = labels.to(log_probs.device)
    if labels.is_floating_point():  # regression: the model's MSE, per row
        predicted = logits.double().reshape(labels.shape[0], -1)
        return (predicted - labels.double().reshape(labels.shape[0], -1)).square().mean(-1)
    if labels.dim() == 1:
        return -log_probs.gather(-1, labels[:, None]).squeeze(-1)
    if causal:
        log_probs, labels = log_probs[:, :-1], labels[:, 1:]
    counted = labels != IGNORED_LABEL
    picked = log_probs.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return -(picked * counted).flatten(1).sum(-1) / counted.flatten(1).sum(-1)  # 0/0: NaN, left out


def _forward(
    model: torch.nn.Module, batch: dict[str, Any], device: torch.device, causal: bool
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The model's loss, the log-probabilities of its scored positions and each row's loss."""
    moved = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }
    output = model(**moved)
    if getattr(output, "loss", None) is None:
        raise LoraMonitorError(
            "eval_batches: the model returned no loss; every batch needs labels (input_ids, attention_mask, labels)"
        )
    log_probs = torch.log_softmax(output.logits.double(), dim=-1)
    rows = _row_losses(output.logits, log_probs, moved["labels"], causal)
    return float(output.loss), _scored_log_probs(log_probs, moved), rows


def _mean_standard_error(differences: list[torch.Tensor]) -> float:
    """Standard error of the mean of the per-row differences (NaN with fewer than two)."""
    values = torch.cat(differences) if differences else torch.empty(0, dtype=torch.float64)
    if values.numel() < 2:
        return math.nan
    return float(values.std() / math.sqrt(values.numel()))


def _progress(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="squeeze: function",
        unit="batch",
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
        leave=False,
    )


@renamed_keywords(energy_threshold="min_variance_retention")
def recommend_rank_by_function(
    model: torch.nn.Module,
    eval_batches: Iterable[dict[str, Any]],
    *,
    ranks: Sequence[int] | None = None,
    tolerance: float | None = None,
    adapter_name: str | None = None,
    min_variance_retention: float | None = None,
    by_module_type: bool = False,
    progress: bool | None = None,
    analysis: SqueezeAnalysis | None = None,
    min_loss_retention: float = DEFAULT_LOSS_RETENTION,
) -> FunctionRecommendation:
    """Try every candidate rank on the live PEFT ``model`` and recommend the smallest that keeps its loss.

    ``eval_batches``: dicts the model accepts, with labels (``input_ids``, ``attention_mask``, ``labels``;
    :func:`lora_monitor.edit.calibration_batches` makes them from texts). ``ranks`` defaults to the powers of
    two up to the adapter's rank, plus that rank (rank 1 is always measured: it is the retention's
    reference). By default the smallest rank that keeps ``min_loss_retention`` (0.95) of the held-out loss
    reduction the directions beyond the first bring is recommended (see :class:`FunctionRecommendation`).
    ``tolerance`` instead allows a fixed relative loss increase (0.01: the truncated model's mean loss at most
    1% above the uncompressed model's). The adapter is also measured zeroed (``base_loss``,
    ``adapter_gain``), and every loss increase comes with the standard error of its per-row differences.
    The model runs in eval
    mode (no dropout) and is given back in its own mode with its factors bit-identical, even on an error.
    ``by_module_type`` also tries each rank on one module type at a time (the others at full rank): one
    more pass per candidate rank and module type.
    ``progress`` forces the progress bar on or off (by default it shows when stderr is a terminal).
    ``analysis``: the energy table of this adapter when you already have one (:func:`analyze_adapter`), shown
    beside the losses instead of analysing again; its candidate ranks and threshold are the defaults then.
    Only scored tokens count: a row with none (every label -100; a one-token text in a causal LM, which has
    nothing to predict) is left out and counted in ``unscored_texts``. Evaluation data that scores no
    token, or a NaN/Inf loss of the uncompressed model, is a :class:`LoraMonitorError`: no advice is
    computed from a NaN.
    """
    rule = "retention" if tolerance is None else "tolerance"
    tolerance = DEFAULT_TOLERANCE if tolerance is None else validate_tolerance(tolerance)
    min_loss_retention = validate_threshold(min_loss_retention, "min_loss_retention")
    if min_variance_retention is None:
        min_variance_retention = DEFAULT_THRESHOLD if analysis is None else analysis.min_variance_retention
    min_variance_retention = validate_threshold(min_variance_retention, "min_variance_retention")
    batches = list(eval_batches)
    if not batches:
        raise LoraMonitorError("eval_batches is empty: give at least one batch with labels")
    causal = is_causal_lm(model)
    scored = check_scored(batches, causal, "eval_batches")
    model = unwrap_model(model)
    records = find_lora_modules(model, adapter_name)
    if not records:
        raise LoraMonitorError("the model has no LoRA modules to truncate")
    check_in_forward(records, "recommend_rank_by_function")
    source_rank = max(record.rank for record in records)
    if ranks is None:
        candidates = (
            default_candidate_ranks(source_rank) if analysis is None else list(analysis.candidate_ranks)
        )
    else:
        candidates = sorted({validate_rank(rank, "every candidate rank") for rank in ranks})
        if not candidates:
            raise LoraMonitorError("ranks is empty: give at least one rank, or None for the default")
    check_ranks_within(candidates, source_rank, "candidate rank")
    if analysis is None:
        analysis = analyze_adapter(
            model,
            min_variance_retention=min_variance_retention,
            candidate_ranks=candidates,
            adapter_name=adapter_name,
            progress=False,
        )
    elif {m.name: m.rank for m in analysis.modules} != {r.name: r.rank for r in records} or (
        analysis.candidate_ranks != candidates or analysis.min_variance_retention != min_variance_retention
    ):
        raise LoraMonitorError(
            f"the analysis given ({analysis.source}, ranks {analysis.candidate_ranks} at "
            f"{analysis.min_variance_retention:g}) is not of this model's LoRA modules at ranks {candidates} "
            f"and threshold {min_variance_retention:g}"
        )
    if analysis.num_modules == 0:  # truncating a zero delta changes nothing: every rank would "keep" the loss
        raise LoraMonitorError(f"{analysis.source}: {ALL_ZERO}; the rank by function was not measured")
    energy = analysis
    measured_ranks = sorted({1, *candidates})
    pairs = _pairs(model, adapter_name, measured_ranks)
    types = sorted({pair.module_type for pair in pairs}) if by_module_type else []
    # (module type or None for all, rank): which pairs are truncated in that evaluation
    # Rank 0 (every pair zeroed) measures what the adapter gained over the base model on these batches; rank 1
    # is the retention's reference, measured even when it is not a candidate.
    settings = [(None, rank) for rank in [0, *measured_ranks]]
    settings += [(kind, rank) for kind in types for rank in measured_ranks]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {setting: [0.0, 0.0, 0] for setting in settings}  # weighted loss, KL sum, scored positions
    differences: dict[tuple[str | None, int], list[torch.Tensor]] = {setting: [] for setting in settings}
    full_loss, rows = 0.0, 0
    # A batch that scores no token has a NaN loss (a mean over nothing): it is left out, not averaged in.
    measured = [
        (index, batch) for index, (batch, count) in enumerate(zip(batches, scored, strict=True)) if count
    ]
    try:
        with torch.no_grad(), _progress(len(measured) * (len(settings) + 1), progress) as bar:
            for index, batch in measured:
                # Reference first, with the original factors in place; then each setting against it.
                _restore(pairs)
                size = scored_rows(batch, causal)
                loss, reference, reference_rows = _forward(model, batch, device, causal)
                loss = finite_loss(loss, "eval_batches", index)
                counted = ~reference_rows.isnan()  # the rows that score a token
                full_loss += loss * size
                rows += size
                bar.update(1)
                for kind, rank in settings:
                    if kind is not None:
                        _restore(pairs)
                    for pair in pairs:
                        if kind is None or pair.module_type == kind:
                            _write(pair, rank)
                    loss, truncated, rows_loss = _forward(model, batch, device, causal)
                    differences[(kind, rank)].append((rows_loss - reference_rows)[counted].cpu())
                    kl = (reference.exp() * (reference - truncated)).sum(-1).clamp_min(0.0)
                    total = totals[(kind, rank)]
                    total[0] += loss * size
                    total[1] += float(kl.sum())
                    total[2] += int(kl.numel())
                    bar.update(1)
    finally:
        _restore(pairs)
        model.train(was_training)
    full_loss /= rows
    evaluations: dict[str | None, dict[int, RankEvaluation]] = {}
    for (kind, rank), (loss_sum, kl_sum, count) in totals.items():
        loss = loss_sum / rows
        increase = loss - full_loss
        relative = increase / abs(full_loss) if full_loss != 0 else (0.0 if increase <= 0 else math.inf)
        evaluations.setdefault(kind, {})[rank] = RankEvaluation(
            rank,
            loss,
            increase,
            relative,
            kl_sum / max(count, 1),
            _mean_standard_error(differences[(kind, rank)]),
        )
    rows_scored = sum(int(d.numel()) for d in differences[settings[0]])
    rank_one_loss = evaluations[None][1].loss
    for by_rank in evaluations.values():
        reference = by_rank[1].loss - full_loss  # what rank 1 loses; the directions beyond it win it back
        for evaluation in by_rank.values():
            if not math.isfinite(reference):  # rank 1 broke the model: no share of it can be measured
                evaluation.loss_retention = math.nan
            else:
                evaluation.loss_retention = (
                    (by_rank[1].loss - evaluation.loss) / reference if reference > 0 else 1.0
                )
        if 1 not in candidates:
            del by_rank[1]
    if rule == "retention" and not math.isfinite(rank_one_loss):
        warnings.warn(
            f"recommend_rank_by_function: the loss at rank 1 is {rank_one_loss}, so no share of it can be kept; "
            f"the rank is the smallest within a {100 * tolerance:g}% loss increase instead",
            stacklevel=2,
        )
        rule = "tolerance"

    def smallest(by_rank: dict[int, RankEvaluation], rule: str) -> int:
        # A NaN loss (the truncated model broke) is never within.
        if rule == "retention":
            within = [rank for rank in candidates if by_rank[rank].loss_retention >= min_loss_retention]
        else:
            within = [rank for rank in candidates if by_rank[rank].relative_increase <= tolerance]
        return within[0] if within else candidates[-1]

    whole = evaluations[None]
    without_adapter = whole.pop(0)
    return FunctionRecommendation(
        full_loss=full_loss,
        tolerance=tolerance,
        ranks=candidates,
        evaluations=whole,
        recommended_rank=smallest(whole, rule),
        min_variance_retention=energy.min_variance_retention,
        energy_recommended_rank=energy.recommended_rank,
        retained_variance=dict(energy.mean_variance),
        type_evaluations={kind: evaluations[kind] for kind in types},
        type_recommended_ranks={kind: smallest(evaluations[kind], rule) for kind in types},
        energy_type_ranks={
            kind: group.recommended_rank for kind, group in energy.by_module_type.items() if kind in types
        },
        scored_tokens=sum(scored),
        unscored_texts=sum(len(batch["labels"]) - scored_rows(batch, causal) for batch in batches),
        rule=rule,
        min_loss_retention=min_loss_retention,
        rank_by_retention=smallest(whole, "retention"),
        rank_within_tolerance=smallest(whole, "tolerance"),
        rank_one_loss=rank_one_loss,
        scored_rows=rows_scored,
        base_loss=without_adapter.loss,
        adapter_gain=without_adapter.loss_increase,
        adapter_gain_se=without_adapter.increase_se,
    )
