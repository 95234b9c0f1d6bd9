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

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import EDIT_META_NAME, dumps
from ..adapters import LoraModule, factor_parameters, is_masked
from ..errors import LoraMonitorError, some_of
from ..spectrum import decomposition_dtype, factored_svd
from .data import calibration_batches, check_scored, evaluate_loss, finite_loss, is_causal_lm, to_device
from .options import EditConfig, check_batching, edit_config


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
# Sensitivities
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModuleSVD:
    """One module's delta as ``U diag(σ) Vᵀ``, with the names its factors have in the model's parameters."""

    module: LoraModule
    A_name: str
    B_name: str
    U: torch.Tensor  # (m, r)
    sigma: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)


def module_svds(model: torch.nn.Module, modules: list[LoraModule]) -> list[ModuleSVD]:
    """The exact SVD of each module's delta (factored, no ``m×n`` matrix), ready for editing σ."""
    names = {id(param): name for name, param in model.named_parameters()}
    Bs, As = [m.B for m in modules], [m.A for m in modules]
    # The edited factors are written from U and V: decomposed as exactly as the stored factors can hold.
    dtype = decomposition_dtype(*(factor.dtype for factor in Bs + As))
    results = factored_svd(Bs, As, [m.scale for m in modules], dtype=dtype)
    decomposed = []
    for module, (U, S, V) in zip(modules, results, strict=True):
        B_param, A_param = factor_parameters(module.module, module.adapter_name)
        decomposed.append(ModuleSVD(module, names[id(A_param)], names[id(B_param)], U, S.float(), V))
    return decomposed


def _sigma_factors(item: ModuleSVD, sigma: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Factors that give exactly ``U diag(σ) Vᵀ`` through the module's own ``s·B@A``."""
    scale = item.module.scale
    B = (item.U * (sigma / scale)).to(dtype).reshape(item.module.B_shape)
    A = item.V.mT.to(dtype).reshape(item.module.A_shape)
    return {item.B_name: B, item.A_name: A}


def sigma_sensitivities(
    model: torch.nn.Module,
    decomposed: list[ModuleSVD],
    batches: list[dict[str, torch.Tensor]],
    what: str = "calibration data",
) -> list[torch.Tensor]:
    """``∂L/∂σ_k`` for every edited module, summed over ``batches`` (mean loss per batch) and averaged.

    Only ``σ`` gets a gradient: every model parameter is frozen for the duration and restored after.
    Batches that score no token (one-token texts of a causal LM) are left out; data that scores none, or a
    NaN/Inf loss, is a :class:`LoraMonitorError` naming ``what`` (its gradient would be NaN, and so would
    every edited σ).
    """
    from torch.func import functional_call

    counts = check_scored(batches, is_causal_lm(model), what)
    measured = [
        (index, batch) for index, (batch, count) in enumerate(zip(batches, counts, strict=True)) if count
    ]
    device = next(model.parameters()).device
    sigmas = [item.sigma.detach().clone().to(device).requires_grad_(True) for item in decomposed]
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for param in trainable:
        param.requires_grad_(False)
    model.eval()
    try:
        for index, batch in measured:
            substitutes: dict[str, torch.Tensor] = {}
            for item, sigma in zip(decomposed, sigmas, strict=True):
                dtype = item.module.load_B().dtype
                substitutes.update(_sigma_factors(item, sigma, dtype))
            loss = functional_call(model, substitutes, args=(), kwargs=to_device(batch, device)).loss
            finite_loss(loss.detach(), what, index)
            (loss / len(measured)).backward()
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
    masked = [m.name for m in chosen if is_masked(m.module, m.adapter_name)]
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
    config = edit_config(**options)
    check_batching(batch_size, max_length, max_samples)

    model, source_folder = _model_to_edit(model_or_path, base_model, adapter_name)
    from ..adapters import find_lora_modules

    every_module = find_lora_modules(model, adapter_name)
    broken = [m.name for m in every_module if not m.is_finite]
    if broken:  # an edited copy of a broken adapter is still broken, and its losses would mean nothing
        where = source_folder if source_folder is not None else "the model"
        raise LoraMonitorError(
            f"{where}: module {some_of(broken)} has NaN/Inf values in its LoRA factors; "
            "the adapter is broken (diverged training?), nothing was edited"
        )
    modules = _select(every_module, config)
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
        losses["calibration_before"] = evaluate_loss(model, batches, "calibration data")
        losses["heldout_before"] = evaluate_loss(model, heldout, "held-out data")

    decomposed = module_svds(model, modules)
    sensitivities = sigma_sensitivities(model, decomposed, batches)
    generator = torch.Generator().manual_seed(config.seed)
    edits, new_factors = [], []
    with torch.no_grad():
        for item, sensitivity in zip(decomposed, sensitivities, strict=True):
            new_sigma, core, noise = edit_singular_values(item.sigma, sensitivity, config, generator)
            new_factors.append(_edited_factors(item, new_sigma))
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
        # Every module's new factors are checked before any is written: a live model is edited in place.
        # The singular values too: factors that fit the dtype can still multiply into a ΔW that does not.
        overflowed = [
            item.module.name
            for item, edit, (B, A) in zip(decomposed, edits, new_factors, strict=True)
            if not all(
                torch.isfinite(values).all()
                for values in (B, A, torch.tensor(edit.sigma_after, dtype=torch.float64).to(B.dtype))
            )
        ]
        if overflowed:
            raise LoraMonitorError(
                f"the edit gives module {some_of(overflowed)} NaN/Inf factors: {_overflow_cause(config)} "
                f"beyond what {decomposed[0].module.B.dtype} holds; nothing was edited"
            )
        for item, (B, A) in zip(decomposed, new_factors, strict=True):
            B_param, A_param = factor_parameters(item.module.module, item.module.adapter_name)
            B_param.copy_(B)
            A_param.copy_(A)
    if heldout is not None:
        # After the edit a NaN loss means the edit broke the model: refused, nothing is written.
        losses["calibration_after"] = evaluate_loss(model, batches, "calibration data (edited)")
        losses["heldout_after"] = evaluate_loss(model, heldout, "held-out data (edited)")
    result = SpectralEditResult(model, config, edits, losses=losses)
    if output_path is not None:
        result.output_path = _write(result, output_path, adapter_name, source_folder, overwrite)
    return result


def _overflow_cause(config: EditConfig) -> str:
    """What scaled the singular values too far: the options that grow them, when no energy is preserved."""
    if config.preserve_energy is not None:  # the edited σ keep the adapter's energy: its own σ are too large
        return "the adapter's singular values, kept at their energy, are"
    if config.mode == "gd":
        return f"eta={config.eta:g} with preserve_energy=None scales its singular values"
    growing = [
        f"{name}={value:g}"
        for name, value in (
            ("amp_factor", config.amp_factor),
            ("mid_factor", config.mid_factor),
            ("sup_factor", config.sup_factor),
        )
        if value > 1
    ]
    return f"{', '.join(growing) or 'the factors'} with preserve_energy=None scale(s) its singular values"


def _edited_factors(item: ModuleSVD, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's new ``(B, A)`` at the same rank and in its own dtype and shape, so that
    ``s·B@A = U diag(σ) Vᵀ`` with the new σ."""
    scale = item.module.scale
    root = (sigma / abs(scale)).sqrt()
    sign = -1.0 if scale < 0 else 1.0
    B_param, A_param = factor_parameters(item.module.module, item.module.adapter_name)
    B = (sign * item.U.double() * root).to(B_param.dtype).reshape(B_param.shape)
    A = (root.unsqueeze(-1) * item.V.double().mT).to(A_param.dtype).reshape(A_param.shape)
    return B, A


def _model_to_edit(
    model_or_path: Any, base_model: Any, adapter_name: str | None
) -> tuple[torch.nn.Module, Path | None]:
    """The live PEFT model to edit in place, and the adapter folder it was loaded from (None if given live)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path, None
    from ..adapters.base_model import load_onto_base

    folder = Path(model_or_path)
    return load_onto_base(folder, base_model, adapter_name, needed_for="editing a saved adapter"), folder


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
        meta.write_text(dumps(result.to_dict()))
        return write_adapter_folder(
            output_path,
            adapter.config,
            tensors,
            extra_files=[meta],
            source_folder=source_folder,
            overwrite=overwrite,
        )
