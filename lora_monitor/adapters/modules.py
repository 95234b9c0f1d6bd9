"""Finding LoRA pairs: in a live PEFT model, and in an adapter folder saved by ``save_pretrained``.

Both give the same record, :class:`LoraModule`, one per LoRA pair, with the factors as matrices
(``B: m×r``, ``A: r×n``, so that ``ΔW = scale · B @ A``), the scale exactly as PEFT applies it, and what
kind of layer it adapts. Everything else in lora-monitor works on these records.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open

from ..errors import LoraMonitorError
from .factors import (
    MAGNITUDE_SUFFIX,
    PEFT_PREFIX,
    SAVED_A_SUFFIXES,
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
from .scaling import alpha_for_scale, describe_module, module_block, scale_for

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# TRL's GRPOTrainer adds a frozen copy of a pretrained adapter under this name as its reference policy.
REFERENCE_ADAPTER_NAMES = ("ref",)


@dataclass
class LoraModule:
    """One LoRA pair.

    ``name`` is the module's path in the base model, exactly the key PEFT matches ``target_modules``,
    ``rank_pattern`` and ``alpha_pattern`` against (``model.layers.0.self_attn.q_proj``). ``A``/``B`` are
    matrices in the factors' own dtype: a conv kernel is flattened to ``r × (in·kh·kw)``, an embedding's
    ``lora_embedding_A`` is ``r × num_embeddings``. ``scale`` is the module's ``s`` in ``ΔW = s·B@A``.
    ``base_weight`` is the frozen weight the pair adapts, where available (live models only).
    """

    name: str
    module_type: str
    layer_index: int | None
    kind: str  # "linear", "embedding" or "conv"
    rank: int
    alpha: float
    scale: float
    use_rslora: bool
    use_dora: bool
    adapter_name: str
    A_shape: tuple[int, ...]
    B_shape: tuple[int, ...]
    load_A: Callable[[], torch.Tensor] = field(repr=False)
    load_B: Callable[[], torch.Tensor] = field(repr=False)
    module: torch.nn.Module | None = field(default=None, repr=False)
    keys: dict[str, str] = field(default_factory=dict, repr=False)  # state-dict keys in a saved adapter

    @property
    def A(self) -> torch.Tensor:
        """``r × n`` matrix (a view of the live parameter, or read from disk now)."""
        # Shaped from the tensor itself, so a record stays right after In-Squeeze changed the rank.
        factor = self.load_A()
        return factor.reshape(factor.shape[0], -1)

    @property
    def B(self) -> torch.Tensor:
        """``m × r`` matrix (a conv ``lora_B`` kernel is ``out × r × 1 × 1``)."""
        factor = self.load_B()
        return factor.reshape(factor.shape[0], -1)

    @property
    def is_attention(self) -> bool:
        """True for attention projections (q, k, v, o and their fused forms), False for MLP and others."""
        return self.block == "attention"

    @property
    def block(self) -> str:
        """``"attention"``, ``"mlp"`` or ``"other"`` (see :func:`~lora_monitor.adapters.scaling.module_block`)."""
        return module_block(self.name)

    @property
    def base_layer(self) -> torch.nn.Module | None:
        """The frozen layer this pair adapts (live models only)."""
        return self.module.get_base_layer() if self.module is not None else None

    def base_weight(self) -> torch.Tensor | None:
        """The frozen weight as a float matrix (quantized 4/8-bit weights are dequantized), or None.

        Under FSDP2 the weight is gathered whole: a collective, every process must ask in the same order.
        """
        layer = self.base_layer
        if layer is None or getattr(layer, "weight", None) is None:
            return None
        if is_sharded(layer.weight):
            weight = full_tensor(layer.weight.detach())
        else:
            from peft.utils.integrations import dequantize_module_weight

            weight = dequantize_module_weight(layer).detach()
        return weight.reshape(weight.shape[0], -1)


# --------------------------------------------------------------------------------------------------------
# Live models
# --------------------------------------------------------------------------------------------------------


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters present in a live model, in the order they were added."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
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
        if not isinstance(module, LoraLayer) or (
            chosen not in module.lora_A and chosen not in module.lora_embedding_A
        ):
            continue
        kind = factor_kind(module, chosen)
        B_param, A_param = factor_parameters(module, chosen)
        name = strip_prefix(qualified_name)
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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model behind DDP/FSDP/DeepSpeed wrappers (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):  # wrappers nest (a compiled DDP model), never deeply
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


# --------------------------------------------------------------------------------------------------------
# Saved adapters
# --------------------------------------------------------------------------------------------------------


@dataclass
class SavedAdapter:
    """An adapter folder written by ``save_pretrained``, read lazily (one tensor at a time)."""

    path: Path
    config: dict[str, Any]
    weights_file: Path
    keys: list[str]
    modules: list[LoraModule]

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, in its stored dtype."""
        return _read_tensor(self.weights_file, key)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _read_tensor(weights_file: Path, key: str) -> torch.Tensor:
    try:
        if weights_file.suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as handle:
                return handle.get_tensor(key)
        return _load_bin(weights_file)[key]
    except (SafetensorError, OSError, RuntimeError, KeyError) as error:
        raise LoraMonitorError(f"{weights_file}: cannot read tensor {key!r} ({error})") from error


_BIN_CACHE: dict[Path, tuple[float, dict[str, torch.Tensor]]] = {}


def _load_bin(weights_file: Path) -> dict[str, torch.Tensor]:
    # A pickle cannot be read lazily: the last one read is kept (and read again if the file changed).
    stamp = weights_file.stat().st_mtime
    cached = _BIN_CACHE.get(weights_file)
    if cached is None or cached[0] != stamp:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip and runtime errors for a damaged file
            raise LoraMonitorError(
                f"{weights_file}: not a readable PyTorch weights file ({error})"
            ) from error
        if not isinstance(state, dict):
            raise LoraMonitorError(f"{weights_file}: holds a {type(state).__name__}, not a state dict")
        _BIN_CACHE.clear()
        _BIN_CACHE[weights_file] = (stamp, state)
    return _BIN_CACHE[weights_file][1]


def _stored_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    try:
        if weights_file.suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        return {key: tuple(value.shape) for key, value in _load_bin(weights_file).items()}
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        raise LoraMonitorError(f"{weights_file}: not a readable adapter weights file ({error})") from error


def _no_config_message(folder: Path) -> str:
    """Why ``folder`` is no adapter folder; PEFT saves an adapter named ``foo`` as ``folder/foo/``: say so."""
    nested = (
        sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
    )
    if not nested:
        return f"{folder}: no {CONFIG_NAME} here, so this is not a PEFT adapter folder"
    options = " or ".join(f"--adapter-name {name} (adapter_name={name!r})" for name in nested)
    return (
        f"{folder}: no {CONFIG_NAME} here, but PEFT saved adapter(s) {nested} in sub-folders: pass {options}, "
        f"or give {folder / nested[0]}"
    )


def _check_target_modules(config: dict[str, Any], config_file: Path, modules: list[LoraModule]) -> None:
    """Refuse a config whose ``target_modules`` would not put every stored pair back where it was.

    Without ``target_modules`` PEFT falls back to its defaults for the architecture (``q_proj``/``v_proj``
    for Llama), so ``from_pretrained`` would load only some of the stored pairs and silently drop the rest;
    a compressed copy would inherit the defect.
    """
    stored_types = sorted({module.module_type for module in modules})
    target = config.get("target_modules")
    if target is None or target == [] or target == "":
        raise LoraMonitorError(
            f"{config_file}: target_modules is missing, so PEFT would apply this adapter only to its default "
            f'modules for the architecture; add "target_modules": {json.dumps(stored_types)} (the stored '
            "module types)"
        )
    if isinstance(target, str):
        uncovered = [m.name for m in modules if not re.fullmatch(target, m.name)]
    elif isinstance(target, list) and all(isinstance(item, str) for item in target):
        # PEFT's rule for a list: the module path is the name itself or ends with "." + name.
        uncovered = [
            m.name for m in modules if not any(m.name == t or m.name.endswith("." + t) for t in target)
        ]
    else:
        raise LoraMonitorError(
            f"{config_file}: target_modules must be a list of module names or a regex string, got {target!r}"
        )
    if uncovered:
        shown = ", ".join(uncovered[:3]) + (" ..." if len(uncovered) > 3 else "")
        raise LoraMonitorError(
            f"{config_file}: target_modules {target!r} does not cover {len(uncovered)} stored module(s) "
            f"({shown}); PEFT would not load them. Stored module types: {stored_types}"
        )


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json`` as a dict, checked to be a LoRA config."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoraMonitorError(_no_config_message(folder))
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoraMonitorError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise LoraMonitorError(f"{config_file}: holds a JSON {type(config).__name__}, not an adapter config")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraMonitorError(f"{config_file}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")
    return config


def load_adapter(path: str | Path, adapter_name: str | None = None) -> SavedAdapter:
    """Read an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    Only the header is read now; each factor is read when a record's ``A``/``B`` is used. A folder saved
    from a model with several adapters keeps the non-default ones in sub-folders: name one with
    ``adapter_name``. Scales follow the config's ``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern`` and ``use_rslora`` exactly as PEFT applies them.
    """
    folder = Path(path)
    if not folder.exists():
        raise LoraMonitorError(f"{folder}: no such adapter folder")
    if not folder.is_dir():
        raise LoraMonitorError(f"{folder}: is a file; give the adapter folder that holds {CONFIG_NAME}")
    if adapter_name is not None and adapter_name != "default":
        if not (folder / adapter_name).is_dir():
            found = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
            raise LoraMonitorError(
                f"{folder}: no adapter named {adapter_name!r} (adapters in sub-folders: {found or 'none'})"
            )
        folder = folder / adapter_name
    config = read_adapter_config(folder)
    weights_file = folder / SAFETENSORS_NAME
    if not weights_file.is_file():
        weights_file = folder / BIN_NAME
    if not weights_file.is_file():
        raise LoraMonitorError(f"{folder}: neither {SAFETENSORS_NAME} nor {BIN_NAME} is here")
    shapes = _stored_shapes(weights_file)
    modules = []
    for key, shape in shapes.items():
        kind = next((k for suffix, k in SAVED_A_SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is None:
            continue
        suffix = next(s for s in SAVED_A_SUFFIXES if key.endswith(s))
        prefix = key[: -len(suffix)]
        b_key = prefix + suffix.replace("_A", "_B")
        if b_key not in shapes:
            raise LoraMonitorError(f"{weights_file}: {key} has no matching {b_key}")
        b_shape = shapes[b_key]
        rank = shape[0]
        if len(shape) > 2:
            kind = "conv"
        if b_shape[1] != rank:
            raise LoraMonitorError(
                f"{weights_file}: {prefix} has A of shape {list(shape)} and B of shape {list(b_shape)}: "
                f"their ranks differ"
            )
        name = strip_prefix(prefix)
        configured_rank, alpha, scale = scale_for(config, name, where=str(folder / CONFIG_NAME))
        if configured_rank != rank:
            raise LoraMonitorError(
                f"{folder}: module {name} has rank {rank} in its weights but {configured_rank} in "
                f"{CONFIG_NAME} (r / rank_pattern); the config and the weights do not belong together"
            )
        module_type, layer_index = describe_module(name)
        keys = {"A": key, "B": b_key}
        if prefix + MAGNITUDE_SUFFIX in shapes:
            keys["magnitude"] = prefix + MAGNITUDE_SUFFIX
        modules.append(
            LoraModule(
                name=name,
                module_type=module_type,
                layer_index=layer_index,
                kind=kind,
                rank=rank,
                alpha=alpha,
                scale=scale,
                use_rslora=bool(config.get("use_rslora")),
                use_dora=bool(config.get("use_dora")) and "magnitude" in keys,
                adapter_name=adapter_name or "default",
                A_shape=shape,
                B_shape=b_shape,
                load_A=lambda f=weights_file, k=key: _read_tensor(f, k),
                load_B=lambda f=weights_file, k=b_key: _read_tensor(f, k),
                keys=keys,
            )
        )
    if not modules:
        raise LoraMonitorError(f"{weights_file}: holds no LoRA factors (no *.lora_A.weight keys)")
    _check_target_modules(config, folder / CONFIG_NAME, modules)
    modules.sort(key=lambda m: _natural_key(m.name))
    return SavedAdapter(folder, config, weights_file, list(shapes), modules)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
