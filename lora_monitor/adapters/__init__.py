"""LoRA pairs, live and saved: the only room that knows PEFT's internals.

- :mod:`.record`: :class:`LoraModule`, the record of one LoRA pair that every room works on;
- :mod:`.modules`: :func:`find_lora_modules` (live), :func:`open_adapter` (a folder or a live model, with
  config and stored tensors), :func:`lora_modules`, :func:`unwrap_model`;
- :mod:`.saved`: :func:`load_adapter` (a folder, read lazily), :func:`read_adapter_config` and its checks;
- :mod:`.factors`: per-kind access to ``B`` and ``A``, the kept rank of a masked pair, state-dict key names;
- :mod:`.naming`: what a module is called: its type, layer and block, its ``rank_pattern`` key;
- :mod:`.scaling`: the scale rule (α/r, α/√r), the alpha at a new rank;
- :mod:`.folder`: the config at new ranks and the adapter-folder writer.
"""

from .factors import (
    KEPT_RANK_ATTRIBUTE,
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
    live_state_keys,
    local_part,
    nominal_rank,
    saved_keys,
    set_kept_rank,
    write_whole,
    zero_past,
)
from .folder import check_output, lora_config_for_ranks, rank_fields, write_adapter_folder
from .modules import (
    REFERENCE_ADAPTER_NAMES,
    LiveModules,
    OpenedAdapter,
    adapter_names,
    check_in_forward,
    find_lora_modules,
    gather_records,
    lora_modules,
    open_adapter,
    records_are_sharded,
    unwrap_model,
)
from .naming import describe_module, module_block, pattern_key
from .record import LoraModule
from .saved import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, SavedAdapter, load_adapter, read_adapter_config
from .scaling import alpha_at_rank, alpha_for_scale, lora_scale, scale_for

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "KEPT_RANK_ATTRIBUTE",
    "PEFT_PREFIX",
    "REFERENCE_ADAPTER_NAMES",
    "SAFETENSORS_NAME",
    "LiveModules",
    "LoraModule",
    "OpenedAdapter",
    "SavedAdapter",
    "adapter_names",
    "alpha_at_rank",
    "alpha_for_scale",
    "as_A_matrix",
    "as_B_matrix",
    "check_in_forward",
    "check_output",
    "describe_module",
    "factor_kind",
    "factor_parameters",
    "find_lora_modules",
    "full_tensor",
    "gather_records",
    "is_masked",
    "is_sharded",
    "kept_rank",
    "live_factors",
    "live_state_keys",
    "load_adapter",
    "local_part",
    "lora_config_for_ranks",
    "lora_modules",
    "lora_scale",
    "module_block",
    "nominal_rank",
    "open_adapter",
    "pattern_key",
    "rank_fields",
    "read_adapter_config",
    "records_are_sharded",
    "saved_keys",
    "scale_for",
    "set_kept_rank",
    "unwrap_model",
    "write_adapter_folder",
    "write_whole",
    "zero_past",
]
