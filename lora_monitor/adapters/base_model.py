"""Loading the base model an adapter was trained on, offline, and its frozen weights per LoRA module."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from .._io import model_folder
from ..errors import LoraMonitorError
from .record import LoraModule


def load_base_model(folder: str | os.PathLike, *, causal_lm_first: bool = True) -> torch.nn.Module:
    """A model folder saved with ``save_pretrained``, loaded offline (``local_files_only``).

    Tries ``AutoModelForCausalLM`` and then ``AutoModel`` (an encoder such as BERT has no causal head);
    with ``causal_lm_first=False`` only ``AutoModel``. Raises :class:`LoraMonitorError` naming the folder.
    """
    path = model_folder(folder)
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    for auto_class in (AutoModelForCausalLM, AutoModel) if causal_lm_first else (AutoModel,):
        try:
            model = auto_class.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            errors.append(f"{auto_class.__name__}: {error}".splitlines()[0])
        else:
            check_finite_weights(model, str(path))
            return model
    raise LoraMonitorError(f"{path}: could not load the base model ({'; '.join(errors)})")


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """A :class:`LoraMonitorError` naming ``where`` and the first parameter of ``model`` that holds NaN or Inf.

    Why up front: PyTorch's fused attention can turn a NaN weight into finite logits, so a broken base would
    otherwise give finite held-out losses and advice computed from it. The smallest and largest value of
    each parameter are enough (a NaN or an Inf is one of them): about 1 s for 7B parameters on one core,
    where ``isfinite`` on every value takes 40 s. Parameters not in memory (offloaded: ``meta``) are skipped."""
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point() or parameter.is_meta or parameter.numel() == 0:
            continue
        values = parameter.detach()
        if values.element_size() == 1:  # float8: no aminmax kernel for it
            values = values.float()
        if not torch.isfinite(torch.stack(torch.aminmax(values))).all():
            raise LoraMonitorError(
                f"{where}: the base model's {name} holds NaN or Inf values; no advice is computed from it"
            )


def load_onto_base(
    folder: str | os.PathLike,
    base_model: torch.nn.Module | str | os.PathLike | None,
    adapter_name: str | None = None,
    *,
    needed_for: str = "this",
) -> torch.nn.Module:
    """The saved adapter in ``folder`` loaded onto ``base_model`` (a model, or a folder for
    :func:`load_base_model`) as a ``PeftModel`` in eval mode; every failure is a :class:`LoraMonitorError`
    naming the folder (``needed_for`` says what the base was needed for when none is given)."""
    from .saved import load_adapter

    # validated with a clear message; an adapter_name is the sub-folder PEFT saved that adapter in
    folder = load_adapter(folder, adapter_name).path
    if base_model is None:
        raise LoraMonitorError(f"{folder}: {needed_for} needs its base model (base_model=... / --base)")
    if isinstance(base_model, str | os.PathLike):
        base_model = load_base_model(base_model)
    else:
        check_finite_weights(base_model, "base_model")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(folder), is_trainable=False)
    except Exception as error:  # PEFT raises many types for a mismatched base; name both folders
        raise LoraMonitorError(f"{folder}: does not load onto the base model ({error})") from error


def base_weights(
    model: torch.nn.Module, modules: Sequence[LoraModule], where: str
) -> Callable[[str], torch.Tensor | None]:
    """``name -> frozen weight matrix`` of ``model`` for each LoRA module, checked against the adapter's shapes.

    Quantized weights are dequantized (PEFT's ``dequantize_module_weight``). Raises
    :class:`LoraMonitorError` naming ``where`` when a module is missing or has the wrong shape.
    """
    from peft.utils.integrations import dequantize_module_weight

    layers = dict(model.named_modules())
    weights = {}
    for module in modules:
        layer = layers.get(module.name)
        if layer is None or getattr(layer, "weight", None) is None:
            raise LoraMonitorError(
                f"{where}: the base model has no weight for module {module.name}: the adapter was not "
                f"trained on this base"
            )
        weight = dequantize_module_weight(layer).detach()
        weight = weight.reshape(weight.shape[0], -1)
        delta_shape = (module.B_shape[0], math.prod(module.A_shape[1:]))
        if tuple(weight.shape) not in (delta_shape, delta_shape[::-1]):
            raise LoraMonitorError(
                f"{where}: module {module.name} has a base weight of shape {list(weight.shape)} but the "
                f"adapter's ΔW is {list(delta_shape)}: the adapter was not trained on this base"
            )
        weights[module.name] = weight
    return weights.get
