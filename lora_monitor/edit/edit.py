"""Spectral editing of a trained LoRA adapter, guided by calibration gradients.

Each edited module's delta is written as ``ΔW = U diag(σ) Vᵀ`` (exact factored SVD, no ``m×n`` matrix).
The sensitivity of the loss to each singular value, ``g_k = ∂L/∂σ_k``, is measured on a calibration set by
autograd through a σ-parametrised view of the module: the model runs with ``lora_B = U·diag(σ)/s`` and
``lora_A = Vᵀ`` substituted (``torch.func.functional_call``), ``σ`` the only tensor that needs a gradient.
Then the most sensitive directions are amplified and the least sensitive suppressed (``abs_select``),
the same counts are picked at random as a control (``random_index``), or ``σ`` takes a gradient step
(``gd``). The factors are rebuilt at the same rank and scale: ``B = U·√(σ'/s)``, ``A = √(σ'/s)·Vᵀ``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import json_safe
from ..adapters import LoraModule
from ..errors import LoraMonitorError
from ..spectrum import factored_svd

EDIT_META_NAME = "spectral_edit_meta.json"
MODES = ("abs_select", "random_index", "gd")


@dataclass
class EditConfig:
    """The options of one edit, written into ``spectral_edit_meta.json``."""

    mode: str = "abs_select"
    target_modules: tuple[str, ...] = ("down_proj", "o_proj")
    layers: tuple[int, ...] | None = None
    core_frac: float = 0.2
    noise_frac: float = 0.2
    amp_factor: float = 1.25
    sup_factor: float = 0.8
    mid_factor: float = 1.0
    eta: float = 0.2
    update: str = "multiplicative"
    preserve_energy: str | None = "l1"
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LoraMonitorError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.update not in ("multiplicative", "additive"):
            raise LoraMonitorError(f"update must be 'multiplicative' or 'additive', got {self.update!r}")
        if self.preserve_energy not in ("l1", "l2", None):
            raise LoraMonitorError(
                f"preserve_energy must be 'l1', 'l2' or None, got {self.preserve_energy!r}"
            )
        for name in ("core_frac", "noise_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise LoraMonitorError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.core_frac + self.noise_frac > 1:
            raise LoraMonitorError(
                f"core_frac + noise_frac must be at most 1, got {self.core_frac + self.noise_frac}"
            )
        for name in ("amp_factor", "sup_factor", "mid_factor"):
            if getattr(self, name) < 0:
                raise LoraMonitorError(f"{name} must be non-negative, got {getattr(self, name)}")


@dataclass
class ModuleEdit:
    """What happened to one module: σ before and after, the sensitivities, the chosen directions."""

    name: str
    rank: int
    k_core: int
    k_noise: int
    sigma_before: list[float]
    sigma_after: list[float]
    sensitivity: list[float]
    core_indices: list[int] = field(default_factory=list)
    noise_indices: list[int] = field(default_factory=list)


@dataclass
class SpectralEditResult:
    """The edited live model, the per-module record, and (when asked) losses and the written folder."""

    model: torch.nn.Module
    config: EditConfig
    modules: list[ModuleEdit]
    output_path: Path | None = None
    losses: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "modules": [asdict(m) for m in self.modules],
            "losses": self.losses,
        }


# --------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------


def calibration_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 2,
    max_length: int = 256,
    max_samples: int | None = 32,
    text_field: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids``/``attention_mask``/``labels`` from texts, a ``datasets.Dataset`` or batches.

    ``data`` may be a list of strings (tokenized with ``tokenizer``), a ``datasets.Dataset`` with a
    ``text_field`` column (tokenized) or already tokenized ``input_ids``, or a list of ready batches
    (dicts of tensors). Padding positions get label ``-100``.
    """
    ready = isinstance(data, Sequence) and data and isinstance(data[0], dict)
    if ready and isinstance(data[0].get("input_ids"), torch.Tensor) and data[0]["input_ids"].dim() == 2:
        return list(data)  # already batches: used as given
    columns = getattr(data, "column_names", None)
    if columns is not None and text_field not in columns and "input_ids" in columns:
        rows = list(data.select(range(min(len(data), max_samples or len(data)))))
        ids = [row["input_ids"] for row in rows]
        return _pad_batches(ids, batch_size, getattr(tokenizer, "pad_token_id", 0) or 0)
    texts = list(data[text_field]) if columns is not None else list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise LoraMonitorError(
            "calibration data must be texts, a Dataset with a text column, or tokenized batches"
        )
    if tokenizer is None:
        raise LoraMonitorError("calibration texts need a tokenizer to turn them into tokens")
    if tokenizer.pad_token is None:
        raise LoraMonitorError(
            "the tokenizer has no pad token, so texts cannot be batched; set one first "
            "(tokenizer.pad_token = tokenizer.eos_token is the usual choice for causal LMs)"
        )
    texts = texts[: max_samples or None]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = -100
        batches.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
        )
    return batches


def _pad_batches(ids: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(row) for row in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(chunk):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean language-model loss of ``model`` over ``batches`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = [float(model(**_to_device(batch, device)).loss) for batch in batches]
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


# --------------------------------------------------------------------------------------------------------
# Sensitivities
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Decomposed:
    module: LoraModule
    A_name: str
    B_name: str
    U: torch.Tensor  # (m, r)
    sigma: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)


def _decompose(model: torch.nn.Module, modules: list[LoraModule]) -> list[_Decomposed]:
    names = {id(param): name for name, param in model.named_parameters()}
    results = factored_svd([m.B for m in modules], [m.A for m in modules], [m.scale for m in modules])
    decomposed = []
    for module, (U, S, V) in zip(modules, results, strict=True):
        adapter = module.adapter_name
        A_param, B_param = module.module.lora_A[adapter].weight, module.module.lora_B[adapter].weight
        decomposed.append(_Decomposed(module, names[id(A_param)], names[id(B_param)], U, S.float(), V))
    return decomposed


def _substitutes(item: _Decomposed, sigma: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Factors that give exactly ``U diag(σ) Vᵀ`` through the module's own ``s·B@A``."""
    scale = item.module.scale
    B = (item.U * (sigma / scale)).to(dtype).reshape(item.module.B_shape)
    A = item.V.mT.to(dtype).reshape(item.module.A_shape)
    return {item.B_name: B, item.A_name: A}


def sigma_sensitivities(
    model: torch.nn.Module, decomposed: list[_Decomposed], batches: list[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """``∂L/∂σ_k`` for every edited module, summed over ``batches`` (mean loss per batch) and averaged.

    Only ``σ`` gets a gradient: every model parameter is frozen for the duration and restored after.
    """
    from torch.func import functional_call

    device = next(model.parameters()).device
    sigmas = [item.sigma.detach().clone().to(device).requires_grad_(True) for item in decomposed]
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for param in trainable:
        param.requires_grad_(False)
    model.eval()
    try:
        for batch in batches:
            substitutes: dict[str, torch.Tensor] = {}
            for item, sigma in zip(decomposed, sigmas, strict=True):
                dtype = item.module.load_B().dtype
                substitutes.update(_substitutes(item, sigma, dtype))
            loss = functional_call(model, substitutes, args=(), kwargs=_to_device(batch, device)).loss
            (loss / len(batches)).backward()
    finally:
        for param in trainable:
            param.requires_grad_(True)
        model.train(was_training)
    return [
        sigma.grad.detach().clone() if sigma.grad is not None else torch.zeros_like(sigma) for sigma in sigmas
    ]


# --------------------------------------------------------------------------------------------------------
# Editing σ
# --------------------------------------------------------------------------------------------------------


def edit_singular_values(
    sigma: torch.Tensor, sensitivity: torch.Tensor, config: EditConfig, generator: torch.Generator
) -> tuple[torch.Tensor, list[int], list[int]]:
    """New singular values for one module, with the indices amplified (core) and suppressed (noise)."""
    rank = sigma.shape[0]
    sigma = sigma.double()
    sensitivity = sensitivity.double()
    core: list[int] = []
    noise: list[int] = []
    if config.mode == "gd":
        # The step is relative to the module's largest sensitivity, so that eta means the same in every module.
        top = sensitivity.abs().max()
        step = sensitivity / top if top > 0 else torch.zeros_like(sensitivity)
        if config.update == "additive":
            new = sigma - config.eta * step * sigma.max()
        else:
            new = sigma * torch.exp(-config.eta * step)
        new = new.clamp_min(0)
    else:
        k_core = round(config.core_frac * rank)
        k_noise = min(round(config.noise_frac * rank), rank - k_core)
        if config.mode == "abs_select":
            order = torch.argsort(sensitivity.abs(), descending=True, stable=True).tolist()
        else:
            order = torch.randperm(rank, generator=generator).tolist()
        core, noise = order[:k_core], order[rank - k_noise :] if k_noise else []
        factors = torch.full_like(sigma, config.mid_factor)
        factors[core] = config.amp_factor
        factors[noise] = config.sup_factor
        new = sigma * factors
    if config.preserve_energy == "l1" and new.sum() > 0:
        new = new * (sigma.sum() / new.sum())
    elif config.preserve_energy == "l2" and (new**2).sum() > 0:
        new = new * torch.sqrt((sigma**2).sum() / (new**2).sum())
    return new, sorted(core), sorted(noise)


def _select(modules: list[LoraModule], config: EditConfig) -> list[LoraModule]:
    chosen = [
        m
        for m in modules
        if m.kind == "linear"
        and (not config.target_modules or m.module_type in config.target_modules)
        and (config.layers is None or m.layer_index in config.layers)
    ]
    masked = [m.name for m in chosen if m.module.lora_A[m.adapter_name].weight.shape[0] != m.rank]
    if masked:
        raise LoraMonitorError(
            f"{masked[0]} (and {len(masked) - 1} more) is masked by In-Squeeze: compact it first "
            "(lora_monitor.compact_masks(model)) or edit the saved adapter"
        )
    if not chosen:
        available = sorted({m.module_type for m in modules})
        raise LoraMonitorError(
            f"no LoRA module matches target_modules={list(config.target_modules)} and layers={config.layers}; "
            f"the adapter's linear LoRA modules are {available}"
        )
    return chosen


def spectral_edit(
    model_or_path: Any,
    calibration_data: Any,
    *,
    tokenizer: Any = None,
    base_model: Any = None,
    output_path: str | os.PathLike | None = None,
    heldout_data: Any = None,
    adapter_name: str | None = None,
    batch_size: int = 2,
    max_length: int = 256,
    max_samples: int | None = 32,
    overwrite: bool = False,
    **options: Any,
) -> SpectralEditResult:
    """Edit an adapter's singular values by their calibration sensitivity; returns the edited model.

    ``model_or_path`` is a live ``PeftModel`` (edited in place) or an adapter folder (then ``base_model``,
    a model or a model folder, is needed). ``options`` are the fields of :class:`EditConfig` (``mode``,
    ``target_modules``, ``layers``, ``core_frac``, ``noise_frac``, ``amp_factor``, ``sup_factor``,
    ``mid_factor``, ``eta``, ``update``, ``preserve_energy``, ``seed``). With ``output_path`` the edited
    adapter is written there (config, weights in their original dtype, ``spectral_edit_meta.json``).
    With ``heldout_data`` the calibration and held-out losses before and after are measured.
    """
    unknown = set(options) - set(EditConfig.__dataclass_fields__)
    if unknown:
        raise LoraMonitorError(f"unknown spectral_edit options {sorted(unknown)}")
    if "target_modules" in options and options["target_modules"] is not None:
        options["target_modules"] = tuple(options["target_modules"])
    if options.get("layers") is not None:
        options["layers"] = tuple(options["layers"])
    config = EditConfig(**options)
    config.validate()

    model, source_folder = _live_model(model_or_path, base_model, adapter_name)
    from ..adapters import find_lora_modules

    modules = _select(find_lora_modules(model, adapter_name), config)
    batches = calibration_batches(
        calibration_data, tokenizer, batch_size=batch_size, max_length=max_length, max_samples=max_samples
    )
    heldout = (
        calibration_batches(
            heldout_data, tokenizer, batch_size=batch_size, max_length=max_length, max_samples=None
        )
        if heldout_data is not None
        else None
    )
    losses: dict[str, float] = {}
    if heldout is not None:
        losses["calibration_before"] = evaluate_loss(model, batches)
        losses["heldout_before"] = evaluate_loss(model, heldout)

    decomposed = _decompose(model, modules)
    sensitivities = sigma_sensitivities(model, decomposed, batches)
    generator = torch.Generator().manual_seed(config.seed)
    edits = []
    with torch.no_grad():
        for item, sensitivity in zip(decomposed, sensitivities, strict=True):
            new_sigma, core, noise = edit_singular_values(item.sigma, sensitivity, config, generator)
            _write_factors(item, new_sigma)
            edits.append(
                ModuleEdit(
                    name=item.module.name,
                    rank=item.module.rank,
                    k_core=len(core),
                    k_noise=len(noise),
                    sigma_before=item.sigma.double().tolist(),
                    sigma_after=new_sigma.tolist(),
                    sensitivity=sensitivity.double().tolist(),
                    core_indices=core,
                    noise_indices=noise,
                )
            )
    if heldout is not None:
        losses["calibration_after"] = evaluate_loss(model, batches)
        losses["heldout_after"] = evaluate_loss(model, heldout)
    result = SpectralEditResult(model, config, edits, losses=losses)
    if output_path is not None:
        result.output_path = _write(result, output_path, adapter_name, source_folder, overwrite)
    return result


def _write_factors(item: _Decomposed, sigma: torch.Tensor) -> None:
    module, adapter = item.module.module, item.module.adapter_name
    scale = item.module.scale
    root = (sigma / abs(scale)).sqrt()
    sign = -1.0 if scale < 0 else 1.0
    A_param, B_param = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    B_param.copy_((sign * item.U.double() * root).to(B_param.dtype).reshape(B_param.shape))
    A_param.copy_((root.unsqueeze(-1) * item.V.double().mT).to(A_param.dtype).reshape(A_param.shape))


def _live_model(
    model_or_path: Any, base_model: Any, adapter_name: str | None
) -> tuple[torch.nn.Module, Path | None]:
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path, None
    from peft import PeftModel

    from ..adapters import load_adapter

    folder = Path(model_or_path)
    load_adapter(folder, adapter_name)  # validates the folder with a clear message
    if base_model is None:
        raise LoraMonitorError(
            f"{folder}: editing a saved adapter needs its base model (base_model=... / --base)"
        )
    if isinstance(base_model, str | Path):
        from ..adapters.base_model import load_base_model

        base_model = load_base_model(base_model)
    try:
        model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=False)
    except Exception as error:  # PEFT raises many types for a mismatched base; name both folders
        raise LoraMonitorError(f"{folder}: does not load onto the base model ({error})") from error
    return model, folder


def _write(
    result: SpectralEditResult,
    output_path: str | os.PathLike,
    adapter_name: str | None,
    source_folder: Path | None,
    overwrite: bool,
) -> Path:
    from ..adapters import open_adapter, write_adapter_folder

    adapter = open_adapter(result.model, adapter_name)
    tensors = {key: adapter.tensor(key) for key in adapter.keys}
    if source_folder is not None:
        # PEFT loaded the adapter in the base model's dtype: write each tensor back in its stored dtype.
        stored = open_adapter(source_folder, adapter_name)
        tensors = {
            key: tensor.to(stored.tensor(key).dtype) if key in stored.keys else tensor
            for key, tensor in tensors.items()
        }
    with tempfile.TemporaryDirectory() as scratch:
        meta = Path(scratch) / EDIT_META_NAME
        meta.write_text(json.dumps(json_safe(result.to_dict()), indent=2) + "\n")
        return write_adapter_folder(
            output_path,
            adapter.config,
            tensors,
            extra_files=[meta],
            source_folder=source_folder,
            overwrite=overwrite,
        )
