"""Finding LoRA pairs in a live PEFT model, and opening any adapter (live model or folder) the same way.

:func:`find_lora_modules` reads a live model into :class:`~.record.LoraModule` records (views of the live
parameters); :func:`open_adapter` takes a folder, a :class:`~.saved.SavedAdapter` or a model and gives the
records plus the config and stored tensors an adapter writer starts from. Folders are read by :mod:`.saved`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraMonitorError
from .factors import (
    KEPT_RANK_ATTRIBUTE,
    MAGNITUDE_SUFFIX,
    PEFT_PREFIX,
    as_A_matrix,
    as_B_matrix,
    factor_kind,
    factor_parameters,
    full_tensor,
    is_masked,
    is_sharded,
    kept_rank,
    live_factors,
    saved_keys,
    strip_prefix,
)
from .naming import describe_module
from .record import LoraModule
from .saved import SavedAdapter, load_adapter
from .scaling import alpha_for_scale

# TRL's GRPOTrainer adds a frozen copy of a pretrained adapter under this name as its reference policy.
REFERENCE_ADAPTER_NAMES = ("ref",)


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters present in a live model, in the order they were added."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, _lora_layer_class()):
            for name in (*module.lora_A.keys(), *module.lora_embedding_A.keys()):
                names[name] = None
    return list(names)


def _choose_adapter(model: torch.nn.Module, adapter_name: str | None, available: list[str]) -> str:
    if not available:
        raise LoraMonitorError(f"{type(model).__name__} has no LoRA modules: nothing to analyse")
    if adapter_name is not None:
        if adapter_name not in available:
            raise LoraMonitorError(
                f"adapter {adapter_name!r} is not in {type(model).__name__}; its adapters are {available}"
            )
        return adapter_name
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str) and active in available and active not in REFERENCE_ADAPTER_NAMES:
        return active
    trainable = [name for name in available if name not in REFERENCE_ADAPTER_NAMES]
    if not trainable:
        raise LoraMonitorError(f"{type(model).__name__} holds only reference adapters {available}")
    return trainable[0]


def find_lora_modules(model: torch.nn.Module, adapter_name: str | None = None) -> list[LoraModule]:
    """Every LoRA pair of one adapter in a live model (a ``PeftModel``, or any model PEFT injected into).

    Without ``adapter_name`` the active adapter is taken, never TRL's frozen ``ref`` adapter. The records
    hold views of the live parameters: read them again after a step to see the new values.
    """
    model = unwrap_model(model)
    chosen = _choose_adapter(model, adapter_name, adapter_names(model))
    records: list[LoraModule] = []
    for qualified_name, module in model.named_modules():
        if not isinstance(module, _lora_layer_class()) or (
            chosen not in module.lora_A and chosen not in module.lora_embedding_A
        ):
            continue
        name = strip_prefix(qualified_name)
        if chosen in getattr(module, "merged_adapters", ()):
            # Its base weight holds W + ΔW: dominance and update scale would be measured against the merged
            # weight, and a factor changed now would leave W + ΔW_old behind at unmerge_adapter().
            raise LoraMonitorError(
                f"module {name}: adapter {chosen!r} is merged into its base weight (merge_adapter()); call "
                "unmerge_adapter() first"
            )
        kind = factor_kind(module, chosen)
        B_param, A_param = factor_parameters(module, chosen)
        module_type, layer_index = describe_module(name)
        rank = kept_rank(module, chosen)
        scale = float(module.scaling[chosen])
        use_rslora = bool(module.use_rslora.get(chosen, False))
        # A masked module is the adapter it saves as: rank ``kept`` with the alpha that keeps its scale.
        alpha = (
            alpha_for_scale(scale, rank, use_rslora)
            if is_masked(module, chosen)
            else float(module.lora_alpha[chosen])
        )
        records.append(
            LoraModule(
                name=name,
                module_type=module_type,
                layer_index=layer_index,
                kind=kind,
                rank=rank,
                alpha=alpha,
                scale=scale,
                use_rslora=use_rslora,
                use_dora=bool(module.use_dora.get(chosen, False)),
                adapter_name=chosen,
                A_shape=(rank, *A_param.shape[1:]),
                B_shape=(B_param.shape[0], rank, *B_param.shape[2:]),
                # Looked up at every read: a record stays valid after In-Squeeze swaps or masks the factors.
                load_A=lambda m=module: live_factors(m, chosen)[1],
                load_B=lambda m=module: live_factors(m, chosen)[0],
                module=module,
            )
        )
    return records


def check_in_forward(records: list[LoraModule], where: str) -> None:
    """Raise a :class:`LoraMonitorError` naming ``where`` unless the adapter of ``records`` takes part in the
    model's forward pass: not disabled (``with model.disable_adapter():``) and active (``set_adapter``). A
    measurement by function of an adapter that is not in the forward pass sees every rank lose nothing."""
    for record in records:
        module = record.module
        if module is None:
            continue
        if getattr(module, "disable_adapters", False):
            raise LoraMonitorError(
                f"{where}: the adapters of the model are disabled (module {record.name}; inside "
                "`with model.disable_adapter():`?), so truncating one changes nothing the model computes"
            )
        active = getattr(module, "active_adapters", None)
        if active is not None and record.adapter_name not in active:
            raise LoraMonitorError(
                f"{where}: adapter {record.adapter_name!r} is not active in module {record.name} (active: "
                f"{', '.join(map(repr, active)) or 'none'}), so truncating it changes nothing the model computes; "
                f"call model.set_adapter({record.adapter_name!r}) first"
            )


def gather_records(records: list[LoraModule]) -> list[LoraModule]:
    """Records whose factors are read now, in full, in every process: what FSDP2 needs.

    Under FSDP2 each process holds a shard of every factor, and gathering one is a collective that every
    process must join in the same order; so before any process works on its own share of the modules,
    all of them gather every module here, in record order. The returned records hold those full tensors
    (a snapshot: read again after the next step). Records of unsharded models come back unchanged.
    """
    if not records_are_sharded(records):
        return records
    gathered = []
    for record in records:
        B, A = record.B, record.A  # full_tensor() inside: the same collective order in every process
        gathered.append(dataclasses.replace(record, load_A=lambda A=A: A, load_B=lambda B=B: B))
    return gathered


def records_are_sharded(records: list[LoraModule]) -> bool:
    """True when the records read FSDP2 shards (then reading a factor is a collective)."""
    return any(
        record.module is not None and is_sharded(factor_parameters(record.module, record.adapter_name)[1])
        for record in records
    )


def _lora_layer_class() -> type:
    """PEFT's ``LoraLayer``, imported on first use: reading a saved adapter never needs PEFT."""
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model behind DDP/FSDP/DeepSpeed wrappers (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):  # wrappers nest (a compiled DDP model), never deeply
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


@dataclass
class OpenedAdapter:
    """An adapter opened for reading and writing: records, and (folders, PeftModels) config and stored tensors."""

    description: str
    modules: list[LoraModule]
    config: dict[str, Any] | None = None
    keys: list[str] = field(default_factory=list)
    tensor: Callable[[str], torch.Tensor] | None = None
    folder: Path | None = None


def open_adapter(source: Any, adapter_name: str | None = None, *, with_state: bool = True) -> OpenedAdapter:
    """An adapter folder, a ``SavedAdapter`` or a live PEFT model, as records plus (``with_state``) its config
    and stored tensors keyed as ``save_pretrained`` writes them: what every adapter writer starts from.

    A live model sharded by FSDP2 is gathered whole: every factor and stored tensor, in a fixed order, so
    this is a collective that every process must call; the result is a snapshot that needs no further
    communication (what lets the main process alone analyse and write it). An ``OpenedAdapter`` is
    returned as it is.
    """
    if isinstance(source, OpenedAdapter):
        if with_state and source.tensor is None:
            raise LoraMonitorError(f"{source.description}: opened without its stored tensors")
        return source
    if isinstance(source, str | Path | SavedAdapter):
        saved = source if isinstance(source, SavedAdapter) else load_adapter(source, adapter_name)
        return OpenedAdapter(
            str(saved.path), saved.modules, saved.config, saved.keys, saved.tensor, saved.path
        )
    if not isinstance(source, torch.nn.Module):
        raise LoraMonitorError(
            f"expected an adapter folder, a SavedAdapter or a PEFT model, got {type(source).__name__}"
        )
    model = unwrap_model(source)
    modules = find_lora_modules(model, adapter_name)  # raises when the model has no LoRA
    chosen = modules[0].adapter_name
    description = f"{type(model).__name__} (adapter {chosen!r})"
    sharded = records_are_sharded(modules)
    if sharded:
        modules = gather_records(modules)
    if not with_state:
        return OpenedAdapter(description, modules)
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or chosen not in peft_config:
        raise LoraMonitorError(
            f"{description}: not a PeftModel (no peft_config for {chosen!r}), so there is no adapter config "
            "to write; wrap it with peft.get_peft_model, or save it and compress the folder"
        )
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=chosen)
    if sharded:  # the same keys in the same order in every process: the gathers pair up
        state = {key: full_tensor(value.detach()) for key, value in state.items()}
    config = _plain_config(peft_config[chosen].to_dict())
    config["inference_mode"] = True  # as save_pretrained writes it
    for module in modules:
        module.keys = saved_keys(module.name, module.kind)
        magnitude = PEFT_PREFIX + module.name + MAGNITUDE_SUFFIX
        if magnitude in state:
            module.keys["magnitude"] = magnitude
        missing = [key for key in module.keys.values() if key not in state]
        if missing:
            raise LoraMonitorError(f"{description}: {module.name} is missing from its state dict ({missing})")
    return OpenedAdapter(description, modules, config, list(state), state.__getitem__, None)


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT config dict with JSON types only (sets become sorted lists, enums their values)."""
    plain: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and isinstance(value, str):
            value = value.value
        plain[key] = value
    return plain


def lora_modules(source: Any, adapter_name: str | None = None) -> list[LoraModule]:
    """LoRA pairs of a live model, a :class:`SavedAdapter`, or an adapter folder path."""
    return open_adapter(source, adapter_name, with_state=False).modules


class LiveModules:
    """:func:`lora_modules`, remembered between calls on the same live model: what a monitor asks for at
    every check.

    Walking a model's module tree and building a record per pair costs milliseconds, as much as measuring
    the pairs. The records read the live factors at every access, so they stay right while training
    changes the values; what can make them stale is a change of layout (In-Squeeze swapping or masking a
    pair, a new scale, another active adapter, another model), and that is checked at every call, per
    pair, from a few attributes. LoRA layers injected into the model after the first call are not seen
    until :meth:`forget`. Saved adapters and folders are read afresh every time.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Walk the model again at the next call."""
        self._source: torch.nn.Module | None = None  # what the caller passed (maybe a DDP wrapper)
        self._model: torch.nn.Module | None = None  # the model behind it
        self._key: tuple | None = None
        self._records: list[LoraModule] = []
        self._layout: list[tuple] = []
        self._sharded = False

    def __call__(self, source: Any, adapter_name: str | None = None) -> list[LoraModule]:
        if not isinstance(source, torch.nn.Module):
            return lora_modules(source, adapter_name)
        # The same wrapper holds the same model: unwrapping costs failed attribute lookups through PEFT's
        # __getattr__ chain, twice a step under every_n_steps=1.
        model = self._model if source is self._source else unwrap_model(source)
        self._source = source
        key = (adapter_name, getattr(model, "active_adapter", None))
        if model is not self._model or key != self._key or _layout(self._records) != self._layout:
            records = find_lora_modules(model, adapter_name)
            self._model, self._key, self._layout = model, key, _layout(records)
            self._sharded = records_are_sharded(records)
            self._records = records if self._sharded else [_direct(record) for record in records]
        # Under FSDP2 the records are a snapshot gathered now (a collective, in every process).
        return gather_records(self._records) if self._sharded else self._records

    @property
    def sharded(self) -> bool:
        """True when the model's factors are FSDP2 shards (reading one is a collective)."""
        return self._sharded


def _direct(record: LoraModule) -> LoraModule:
    """The record reading its parameters straight from the objects found now: valid while the layout is
    (which :class:`LiveModules` checks at every call), and several lookups cheaper per read."""
    if is_masked(record.module, record.adapter_name):
        return record
    B_param, A_param = factor_parameters(record.module, record.adapter_name)
    return dataclasses.replace(
        record,
        load_A=lambda A=A_param: as_A_matrix(A.detach()),
        load_B=lambda B=B_param: as_B_matrix(B.detach()),
        live_parameters=(B_param, A_param),
    )


def _layout(records: list[LoraModule]) -> list[tuple]:
    """What a record's fixed fields and direct reads depend on, per pair: the A and B parameters (their
    identity and A's rank), the kept rank of a mask and the scale."""
    layout = []
    for record in records:
        module, name = record.module, record.adapter_name
        # The dicts behind nn.Module's attribute access, read directly: this runs twice a step for every
        # module under every_n_steps=1, and Module.__getattr__ was most of its cost (135 → 15 µs, 28 modules).
        children = module._modules
        A_layer = children["lora_A"]._modules.get(name)
        if A_layer is not None:
            A, B = _weight(A_layer), _weight(children["lora_B"]._modules[name])
        else:
            A, B = children["lora_embedding_A"].get(name), children["lora_embedding_B"].get(name)
        kept = module.__dict__.get(KEPT_RANK_ATTRIBUTE, {}).get(name)
        layout.append((id(A), id(B), None if A is None else A.shape[0], kept, module.scaling.get(name)))
    return layout


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    # A wrapper may hold the weight as a plain attribute instead (FSDP1's flattened parameters do).
    weight = layer._parameters.get("weight")
    return layer.weight if weight is None else weight
