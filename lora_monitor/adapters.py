"""Finding LoRA pairs: in a live PEFT model, and in an adapter folder saved by ``save_pretrained``.

Both give the same record, :class:`LoraModule`, one per LoRA pair, with the factors as matrices
(``B: m×r``, ``A: r×n``, so that ``ΔW = scale · B @ A``), the scale exactly as PEFT applies it, and what
kind of layer it adapts. Everything else in lora-monitor works on these records.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from .errors import LoraMonitorError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# In-Squeeze's mask mode keeps shapes and records on the layer how many leading directions are alive
# ({adapter name: rank}); every record and every saved adapter then shows only those directions.
KEPT_RANK_ATTRIBUTE = "lora_monitor_kept_rank"
# TRL's GRPOTrainer adds a frozen copy of a pretrained adapter under this name as its reference policy.
REFERENCE_ADAPTER_NAMES = ("ref",)

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_A_SUFFIXES = {".lora_A.weight": "linear", ".lora_embedding_A": "embedding"}
_ATTENTION_TYPES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "query",
    "key",
    "value",
    "c_attn",
    "out_proj",
)


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
        return self.module_type in _ATTENTION_TYPES or "attn" in self.name or "attention" in self.name

    @property
    def base_layer(self) -> torch.nn.Module | None:
        """The frozen layer this pair adapts (live models only)."""
        return self.module.get_base_layer() if self.module is not None else None

    def base_weight(self) -> torch.Tensor | None:
        """The frozen weight as a float matrix (quantized 4/8-bit weights are dequantized), or None."""
        layer = self.base_layer
        if layer is None or getattr(layer, "weight", None) is None:
            return None
        from peft.utils.integrations import dequantize_module_weight

        weight = dequantize_module_weight(layer).detach()
        return weight.reshape(weight.shape[0], -1)


def pattern_key(name: str) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key that PEFT matches to module ``name`` and to no other.

    PEFT matches a key ``K`` as the regex ``(.*\\.)?(K)$`` against each module path: escaping the dots and
    anchoring at the start makes the key match exactly one full module path (``layers.1.q_proj`` would
    also match ``layers.11.q_proj``'s tail otherwise, and ``q_proj`` every q_proj).
    """
    return "^" + re.escape(name)


def describe_module(name: str) -> tuple[str, int | None]:
    """``(module type, layer index)`` of a module path: ``("q_proj", 3)`` for ``model.layers.3.self_attn.q_proj``."""
    match = _LAYER_INDEX.search(name)
    return name.rsplit(".", 1)[-1], int(match.group(1)) if match else None


def scale_for(config: dict[str, Any], name: str, rank: int | None = None) -> tuple[int, float, float]:
    """``(r, alpha, scale)`` of module ``name`` from an adapter config, as PEFT computes them.

    ``rank_pattern``/``alpha_pattern`` are matched with PEFT's own ``get_pattern_key``; rsLoRA uses
    ``alpha/√r``. ``rank`` (from the stored weights) overrides the configured r where given.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), config.get("lora_alpha", 8))
    if rank is not None:
        r = rank
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(alpha), float(scale)


def _strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


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
    model = getattr(model, "module", model)  # DistributedDataParallel and friends
    chosen = _choose_adapter(model, adapter_name, adapter_names(model))
    records: list[LoraModule] = []
    for qualified_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if chosen in module.lora_A:
            A_holder, B_holder = module.lora_A[chosen], module.lora_B[chosen]
            A_param, B_param = A_holder.weight, B_holder.weight
            kind = "conv" if A_param.dim() > 2 else "linear"
        elif chosen in module.lora_embedding_A:
            A_param, B_param = module.lora_embedding_A[chosen], module.lora_embedding_B[chosen]
            kind = "embedding"
        else:
            continue
        name = _strip_prefix(qualified_name)
        module_type, layer_index = describe_module(name)
        kept = getattr(module, KEPT_RANK_ATTRIBUTE, {}).get(chosen)
        rank = int(kept) if kept is not None else int(module.r[chosen])
        scale = float(module.scaling[chosen])
        use_rslora = bool(module.use_rslora.get(chosen, False))
        # A masked module is the adapter it saves as: rank ``kept`` with the alpha that keeps its scale.
        alpha = float(module.lora_alpha[chosen]) if kept is None else _alpha_keeping(scale, rank, use_rslora)
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
                load_A=_live_loader(module, chosen, kind, "A", kept),
                load_B=_live_loader(module, chosen, kind, "B", kept),
                module=module,
            )
        )
    return records


def _alpha_keeping(scale: float, rank: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scale`` at ``rank`` (``α/√r`` with rsLoRA, ``α/r`` otherwise)."""
    return scale * math.sqrt(rank) if use_rslora else scale * rank


def _live_loader(
    module: LoraLayer, adapter: str, kind: str, which: str, kept: int | None
) -> Callable[[], torch.Tensor]:
    # Looked up on every call, so that a record stays valid after In-Squeeze swaps the parameters.
    if kind == "embedding":
        holder = module.lora_embedding_A if which == "A" else module.lora_embedding_B
        read = lambda: holder[adapter].detach()  # noqa: E731
    else:
        holder = module.lora_A if which == "A" else module.lora_B
        read = lambda: holder[adapter].weight.detach()  # noqa: E731
    if kept is None:
        return read
    # Masked: only the leading ``kept`` directions are alive (rows of A, columns of B).
    return (lambda: read()[:kept]) if which == "A" else (lambda: read()[:, :kept])


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


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json`` as a dict, checked to be a LoRA config."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoraMonitorError(f"{folder}: no {CONFIG_NAME} here, so this is not a PEFT adapter folder")
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
        kind = next((k for suffix, k in _A_SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is None:
            continue
        suffix = next(s for s in _A_SUFFIXES if key.endswith(s))
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
        name = _strip_prefix(prefix)
        configured_rank, alpha, scale = scale_for(config, name)
        if configured_rank != rank:
            raise LoraMonitorError(
                f"{folder}: module {name} has rank {rank} in its weights but {configured_rank} in "
                f"{CONFIG_NAME} (r / rank_pattern); the config and the weights do not belong together"
            )
        module_type, layer_index = describe_module(name)
        keys = {"A": key, "B": b_key}
        if prefix + ".lora_magnitude_vector" in shapes:
            keys["magnitude"] = prefix + ".lora_magnitude_vector"
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
    modules.sort(key=lambda m: _natural_key(m.name))
    return SavedAdapter(folder, config, weights_file, list(shapes), modules)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def lora_modules(source: Any, adapter_name: str | None = None) -> list[LoraModule]:
    """LoRA pairs of a live model, a :class:`SavedAdapter`, or an adapter folder path."""
    if isinstance(source, SavedAdapter):
        return source.modules
    if isinstance(source, str | Path):
        return load_adapter(source, adapter_name).modules
    if isinstance(source, torch.nn.Module):
        return find_lora_modules(source, adapter_name)
    raise LoraMonitorError(
        f"expected a model, an adapter folder or a SavedAdapter, got {type(source).__name__}"
    )
