"""Per-layer LoRA ranks from the base model's weight spectra (Adaptive-Rank LoRA, Paila et al., 2024).

:func:`spectral_analysis` finds the weights LoRA could adapt (the names PEFT's ``target_modules`` matches)
and summarizes each with :mod:`.htsr`; every eigenvalue comes from one batched dense SVD
(:func:`lora_monitor.spectrum.weight_singular_values`, on the GPU when there is one). :func:`allocate_ranks`
turns the summaries into a ``rank_pattern``/``alpha_pattern`` for PEFT.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._io import json_number
from ..adapters import pattern_key
from ..errors import LoraMonitorError, check_number
from ..spectrum import weight_singular_values
from .htsr import FitRule, LayerSpectrum, spectra_from_eigenvalues
from .options import check_allocation_options, check_fit

Tensor = torch.Tensor
Scaling = Literal["linear", "log", "sqrt"]


# ---- which weights ---------------------------------------------------------------------------------------


@dataclass
class AnalysableWeight:
    """A weight LoRA could adapt: its module path (as PEFT matches it), its layer and its matrix shape."""

    name: str
    module: nn.Module
    rows: int
    columns: int


def _matches(name: str, targets: str | Sequence[str] | None) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full-match regex, a list matches names or name suffixes."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _base_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def analysable_weights(
    model: nn.Module, target_modules: str | Sequence[str] | None, include_embeddings: bool
) -> list[AnalysableWeight]:
    """Linear, Conv1D (GPT-2 style) and Conv2d weights with the names PEFT matches (relative to the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    model = _base_model(model)
    excluded: set[int] = set()
    output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    if output_embeddings is not None and not include_embeddings:
        excluded.add(id(output_embeddings))
    found: list[AnalysableWeight] = []
    inside_adapter: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue  # the LoRA factors and the wrapped base layer of a tuner layer
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(name)
            module = module.get_base_layer()
        if id(module) in excluded or not _matches(name, target_modules):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d):
            rows, columns = weight.shape[0], int(math.prod(weight.shape[1:]))
        elif isinstance(module, Conv1D):
            columns, rows = weight.shape
        elif isinstance(module, nn.Embedding) and include_embeddings:
            rows, columns = weight.shape
        else:
            continue
        if isinstance(module, nn.Linear) and rows * columns != weight.numel():
            # A packed quantized weight: its true shape is the layer's.
            rows, columns = module.out_features, module.in_features
        found.append(AnalysableWeight(name, module, rows, columns))
    return found


def _dense_weight(record: AnalysableWeight) -> Tensor:
    """The layer's weight as a float ``rows × columns`` matrix, dequantized first where it is quantized."""
    from peft.utils.integrations import dequantize_module_weight
    from transformers.pytorch_utils import Conv1D

    weight = dequantize_module_weight(record.module).detach()
    if isinstance(record.module, Conv1D):
        weight = weight.T
    weight = weight.reshape(record.rows, record.columns)
    if not weight.is_floating_point():
        raise LoraMonitorError(
            f"module {record.name}: weight of dtype {weight.dtype} could not be dequantized"
        )
    if not bool(torch.isfinite(weight).all()):
        raise LoraMonitorError(f"module {record.name}: weight contains NaN or Inf")
    return weight


# ---- spectral analysis of a model ------------------------------------------------------------------------


def spectral_analysis(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None = None,
    fit: FitRule = "median",
    include_embeddings: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    batch_size: int = 16,
    progress: bool = True,
) -> list[LayerSpectrum]:
    """One :class:`LayerSpectrum` per Linear/Conv1D/Conv2d weight of ``model``, in module order.

    ``target_modules`` selects weights as PEFT's ``LoraConfig(target_modules=...)`` would (names or name
    suffixes, or a full-match regex); the output embeddings (``lm_head``) and embeddings are left out unless
    ``include_embeddings``. A PEFT model is analysed through its base weights; quantized weights are
    dequantized first. The singular values come from one batched dense SVD per weight shape on ``device``
    (the GPU when there is one), in ``dtype`` (float64 by default), with a progress bar when ``progress``.
    """
    check_fit(fit)
    check_number(batch_size, "batch_size", low=1, whole=True)
    records = analysable_weights(model, target_modules, include_embeddings)
    if not records:
        raise LoraMonitorError(
            f"no Linear/Conv weights to analyse in {type(model).__name__}"
            + (f" matching target_modules={target_modules!r}" if target_modules is not None else "")
        )
    singular_values = weight_singular_values(
        [_dense_weight(record) for record in records],
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
        description="weight spectra",
    )
    return [
        spectra_from_eigenvalues(record.name, values**2, record.rows, record.columns, fit)
        for record, values in zip(records, singular_values, strict=True)
    ]


# ---- rank allocation -------------------------------------------------------------------------------------


@dataclass
class LayerAllocation:
    """One analysed layer: its spectrum, its composite score, and the rank/alpha it gets (0 if not adapted)."""

    spectrum: LayerSpectrum
    score: float
    selected: bool
    rank: int
    alpha: float

    @property
    def name(self) -> str:
        return self.spectrum.name

    @property
    def parameters(self) -> int:
        """Trainable LoRA parameters this layer gets: ``r·(m + n)``."""
        return self.rank * sum(self.spectrum.shape)

    def as_dict(self) -> dict[str, Any]:
        """The layer's spectrum summary with its score and what it gets (JSON-ready)."""
        return {
            **self.spectrum.as_dict(),
            "score": self.score,
            "selected": self.selected,
            "rank": self.rank,
            "lora_alpha": self.alpha,
        }


@dataclass
class RankAllocation:
    """Per-layer LoRA ranks, ready for ``LoraConfig(**allocation.lora_config_kwargs())``.

    ``rank_pattern``/``alpha_pattern`` map module paths (``model.layers.0.self_attn.q_proj``, as PEFT's
    ``get_pattern_key`` matches them) to ranks and alphas; ``target_modules`` lists the adapted modules.
    ``layers`` has every analysed layer, adapted or not, in module order.
    """

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]
    layers: list[LayerAllocation] = field(default_factory=list)
    parameter_budget: int | None = None

    def __iter__(self):
        """``rank_pattern, alpha_pattern, target_modules = allocate_ranks(model)`` also works."""
        return iter((self.rank_pattern, self.alpha_pattern, self.target_modules))

    @property
    def trainable_parameters(self) -> int:
        """Total LoRA parameters of the adapted layers, ``Σ r·(m + n)``."""
        return sum(layer.parameters for layer in self.layers if layer.selected)

    def as_dict(self) -> dict[str, Any]:
        """Every layer, the ``LoraConfig`` arguments, the parameter count and the budget (JSON-ready)."""
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "lora_config": self.lora_config_kwargs(),
            "trainable_parameters": self.trainable_parameters,
            "parameter_budget": self.parameter_budget,
        }

    def lora_config_kwargs(self) -> dict[str, Any]:
        """``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern`` for ``LoraConfig``.

        Every adapted module has its own pattern entry; ``r``/``lora_alpha`` are the most common pair and only
        matter for modules added later by other means.
        """
        ranks = list(self.rank_pattern.values())
        r = max(set(ranks), key=ranks.count) if ranks else 8
        alphas = [a for name, a in self.alpha_pattern.items() if self.rank_pattern[name] == r]
        return {
            "r": r,
            "lora_alpha": alphas[0] if alphas else 2 * r,
            "target_modules": list(self.target_modules),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }


def _normalize(values: Tensor) -> Tensor:
    """Min-max scaling to [0, 1]; a constant column becomes all zeros."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low + 1e-8)


def _profile(scores: Tensor, scaling: Scaling) -> Tensor:
    """Where each score sits between the lowest and the highest, in [0, 1], after the chosen scaling."""
    transforms = {"linear": lambda x: x, "log": torch.log1p, "sqrt": torch.sqrt}
    scaled = transforms[scaling](scores.clamp_min(0))
    return (scaled - scaled.min()) / (scaled.max() - scaled.min() + 1e-8)


def _budget_ranks(fractions: Tensor, steps: Tensor, caps: Tensor, budget: int, names: list[str]) -> Tensor:
    """Integer ranks proportional to ``fractions`` whose parameter cost ``Σ r·step`` is within one step of ``budget``.

    Find the scale ``c`` with ``Σ clip(c·f, 1, cap)·step = budget`` by bisection, round down, then give one
    more rank to the layers with the largest remainders while the budget allows: what is left over is then
    smaller than the step of any layer that could still grow.
    """
    floor_cost = int(steps.sum())
    ceiling_cost = int((caps * steps).sum())
    if budget < floor_cost:
        raise LoraMonitorError(
            f"parameter budget {budget} is below {floor_cost}, the cost of rank 1 on all {len(names)} adapted layers"
        )
    if budget > ceiling_cost:
        raise LoraMonitorError(
            f"parameter budget {budget} is above {ceiling_cost}, the cost of full rank on every adapted layer"
        )

    def cost(scale: float) -> float:
        return float(((fractions * scale).clamp(1, None).minimum(caps) * steps).sum())

    low, high = 0.0, 1.0
    while cost(high) < budget:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) < budget else (low, middle)
    continuous = (fractions * low).clamp(1, None).minimum(caps)
    ranks = continuous.floor().clamp(1, None)
    spent = int((ranks * steps).sum())
    for index in torch.argsort(continuous - ranks, descending=True, stable=True).tolist():
        if ranks[index] < caps[index] and spent + int(steps[index]) <= budget:
            ranks[index] += 1
            spent += int(steps[index])
    # A second pass: the remainder order may have skipped a cheap layer that still fits.
    for index in torch.argsort(steps, stable=True).tolist():
        while ranks[index] < caps[index] and spent + int(steps[index]) <= budget:
            ranks[index] += 1
            spent += int(steps[index])
    return ranks.to(torch.int64)


def allocate_ranks(
    model_or_spectra: nn.Module | Sequence[LayerSpectrum],
    *,
    min_rank: int = 4,
    max_rank: int = 64,
    layer_fraction: float = 0.5,
    scaling: Scaling = "linear",
    alpha_factor: float = 2.0,
    w_alpha: float = 0.7,
    w_spikes: float = 0.3,
    target_modules: str | Sequence[str] | None = None,
    parameter_budget: int | None = None,
    fit: FitRule = "median",
    progress: bool = True,
) -> RankAllocation:
    """Per-layer LoRA ranks from base-weight spectra (Adaptive-Rank LoRA), ready for ``LoraConfig``.

    Each layer gets the score ``w_alpha·α̂ + w_spikes·(1 - ŝ)``, with ``α̂`` the Hill exponent and ``ŝ`` the MP
    spike count, both min-max scaled over the analysed layers. A high score is a light tail with few spikes:
    a layer close to random, which the method gives more rank. The ``layer_fraction`` of layers with the
    *lowest* scores (the most heavy-tailed, spike-rich ones) is adapted, as in the method's published code;
    within them, ranks go from ``min_rank`` (lowest score) to ``max_rank`` (highest), spaced linearly, or
    by ``log1p``/``sqrt`` of the score, rounded. ``alpha = alpha_factor·rank``.

    With ``parameter_budget``, the adapted layers keep the same rank profile scaled so that the LoRA
    parameter count ``Σ r·(m + n)`` lands within one rank step of the budget (ranks between 1 and
    ``min(m, n)``; ``min_rank``/``max_rank`` then only shape the profile).

    ``model_or_spectra`` is a model (analysed with :func:`spectral_analysis`, ``fit`` and ``target_modules``
    applying) or the list that function returned.
    """
    check_allocation_options(
        min_rank,
        max_rank,
        layer_fraction,
        alpha_factor,
        parameter_budget,
        scaling=scaling,
        fit=fit,
        w_alpha=w_alpha,
        w_spikes=w_spikes,
    )
    if isinstance(model_or_spectra, nn.Module):
        spectra = spectral_analysis(
            model_or_spectra, target_modules=target_modules, fit=fit, progress=progress
        )
    else:
        spectra = [s for s in model_or_spectra if _matches(s.name, target_modules)]
        if not spectra:
            raise LoraMonitorError("no layer spectra to allocate ranks to")
    alphas = torch.tensor([s.alpha for s in spectra], dtype=torch.float64)
    # A failed fit (too few eigenvalues) scores as the most random layer of the model.
    finite = torch.isfinite(alphas)
    if not bool(finite.any()):  # every layer the same score: a rank pattern from no measurement at all
        raise LoraMonitorError(
            f"the power-law fit failed on every one of the {len(spectra)} layer(s) (first: {spectra[0].name}; a "
            "base whose weights are all zero or constant has no spectrum to fit), so no layer can be ranked "
            "against another"
        )
    fallback = float(alphas[finite].max())
    alphas = torch.where(finite, alphas, torch.full_like(alphas, fallback))
    spikes = torch.tensor([float(s.num_spikes) for s in spectra], dtype=torch.float64)
    scores = w_alpha * _normalize(alphas) + w_spikes * (1 - _normalize(spikes))

    count = max(1, int(len(spectra) * layer_fraction))
    chosen = sorted(torch.argsort(scores, stable=True)[:count].tolist())
    profile = _profile(scores[chosen], scaling)
    caps = torch.tensor([min(spectra[i].shape) for i in chosen], dtype=torch.float64)
    if parameter_budget is None:
        ranks = (min_rank + (max_rank - min_rank) * profile).round().clamp(min_rank, max_rank)
        ranks = ranks.minimum(caps).to(torch.int64)
    else:
        steps = torch.tensor([float(sum(spectra[i].shape)) for i in chosen], dtype=torch.float64)
        fractions = min_rank + (max_rank - min_rank) * profile
        ranks = _budget_ranks(
            fractions, steps, caps, int(parameter_budget), [spectra[i].name for i in chosen]
        )

    rank_of = {spectra[i].name: int(r) for i, r in zip(chosen, ranks.tolist(), strict=True)}
    keys = {name: pattern_key(name) for name in rank_of}
    layers = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for index, spectrum in enumerate(spectra):
        rank = rank_of.get(spectrum.name, 0)
        alpha = json_number(alpha_factor * rank)
        layers.append(LayerAllocation(spectrum, float(scores[index]), rank > 0, rank, alpha if rank else 0.0))
        if rank:
            rank_pattern[keys[spectrum.name]] = rank
            alpha_pattern[keys[spectrum.name]] = alpha
    return RankAllocation(rank_pattern, alpha_pattern, list(rank_of), layers, parameter_budget)
