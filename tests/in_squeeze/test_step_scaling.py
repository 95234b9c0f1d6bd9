"""After a squeeze, each squeezed module's optimizer step is scaled by r_source/r_now (the default)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import peft_llama

from lora_monitor import LoraMonitorError, find_lora_modules, squeeze_model
from lora_monitor.adapters import factor_parameters
from lora_monitor.in_squeeze.step_scaling import SqueezedStepScaling

SOURCE, TARGET = 8, 2


def _one_step(model, scaling: SqueezedStepScaling, batch) -> dict[str, torch.Tensor]:
    """Factors moved by one AdamW step (with the scaling hooks around it), per module, B and A stacked."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {
        r.name: [p.detach().clone() for p in factor_parameters(r.module, "default")]
        for r in find_lora_modules(model)
    }
    model(**batch).loss.backward()
    scaling.before_step(model)
    optimizer.step()
    scaling.after_step()
    return {
        r.name: [
            after.detach() - old
            for after, old in zip(factor_parameters(r.module, "default"), before[r.name], strict=True)
        ]
        for r in find_lora_modules(model)
    }


@pytest.mark.parametrize(
    ("scaling", "expected"), [("rank", SOURCE / TARGET), ("sqrt", (SOURCE / TARGET) ** 0.5)]
)
def test_squeezed_modules_step_is_scaled_and_the_others_are_not(scaling, expected):
    model = peft_llama(0, r=SOURCE, target_modules=["q_proj", "v_proj"])
    modules = [r.name for r in find_lora_modules(model)]
    squeezed = [name for name in modules if "q_proj" in name]
    plain, scaled = SqueezedStepScaling("none"), SqueezedStepScaling(scaling)
    plain.factors(model), scaled.factors(model)  # source ranks, read before the squeeze
    squeeze_model(model, {name: TARGET for name in squeezed})  # v_proj stays at its source rank
    twin = copy.deepcopy(model)
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9]]), "labels": torch.tensor([[1, 5, 6, 7, 8, 9]])}
    torch.manual_seed(0)
    moved_plain = _one_step(model, plain, batch)
    torch.manual_seed(0)
    moved_scaled = _one_step(twin, scaled, batch)
    for name in modules:
        factor = expected if name in squeezed else 1.0
        for step_plain, step_scaled in zip(moved_plain[name], moved_scaled[name], strict=True):
            assert step_plain.abs().max() > 0
            torch.testing.assert_close(step_scaled, factor * step_plain, rtol=1e-5, atol=1e-8)


def test_unknown_scaling_is_one_clear_error():
    with pytest.raises(LoraMonitorError, match="lr_scaling must be one of"):
        SqueezedStepScaling("linear")
    from lora_monitor.callbacks import InSqueezeCallback

    with pytest.raises(LoraMonitorError, match="InSqueezeCallback: lr_scaling"):
        InSqueezeCallback(lr_scaling="twice")


def test_the_name_a_message_starts_with_is_the_callers_not_the_librarys():
    from lora_monitor.in_squeeze import InSqueezeOptions

    with pytest.raises(LoraMonitorError) as refused:
        SqueezedStepScaling("linear", where="my_loop")
    assert str(refused.value).startswith("my_loop: lr_scaling must be one of ('rank', 'sqrt', 'none')")
    with pytest.raises(LoraMonitorError) as refused:
        SqueezedStepScaling("linear")
    assert str(refused.value).startswith("lr_scaling must be one of")
    with pytest.raises(LoraMonitorError) as refused:
        InSqueezeOptions(mode="fast")
    assert str(refused.value).startswith("InSqueezeOptions: mode must be one of")
    with pytest.raises(LoraMonitorError, match=r"^my_loop: mode='resize' cannot change"):
        InSqueezeOptions(mode="resize", where="my_loop").resolve_mode(distributed=True)
