"""InSqueezeRun: In-Squeeze driven by a plain PyTorch loop, no Trainer, checked against dense references."""

from __future__ import annotations

import pytest
import torch
from dense_reference import best_rank_k, dense_deltas, relative_error
from tiny_models import peft_llama

from lora_monitor import LoraMonitorError, find_lora_modules
from lora_monitor.adapters import factor_parameters
from lora_monitor.in_squeeze import InSqueezeOptions
from lora_monitor.in_squeeze.run import InSqueezeRun

SOURCE, TARGET, SQUEEZE_STEP, LR = 8, 4, 2, 1e-2
BATCH = {
    "input_ids": torch.tensor([[1, 5, 6, 7, 8, 9, 3, 2]]),
    "labels": torch.tensor([[1, 5, 6, 7, 8, 9, 3, 2]]),
}


def _factors(model) -> dict[str, torch.Tensor]:
    return {
        f"{r.name}.{i}": p.detach().clone()
        for r in find_lora_modules(model)
        for i, p in enumerate(factor_parameters(r.module, r.adapter_name))
    }


def test_a_plain_loop_squeezes_to_the_dense_truncation_and_scales_the_next_step():
    model = peft_llama(0, r=SOURCE, lora_alpha=SOURCE, target_modules=["q_proj", "v_proj"]).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    run = InSqueezeRun(InSqueezeOptions(target_rank=TARGET, schedule=[(SQUEEZE_STEP, TARGET)]))
    run.prepare(model, distributed=False)
    run.begin(model, optimizer, step=0, max_steps=4)
    assert run.mode == "resize" and run.plan == {SQUEEZE_STEP: TARGET}
    for step in range(1, 5):
        model(**BATCH).loss.backward()
        # plain SGD at SOURCE/TARGET times the learning rate, for the modules squeezed below their source rank
        scale = SOURCE / TARGET if step > SQUEEZE_STEP else 1.0
        expected = {
            f"{r.name}.{i}": p.detach() - LR * scale * p.grad
            for r in find_lora_modules(model)
            for i, p in enumerate(factor_parameters(r.module, r.adapter_name))
        }
        run.before_optimizer_step(model)
        optimizer.step()
        run.after_optimizer_step(optimizer)
        optimizer.zero_grad()
        for name, moved in _factors(model).items():
            torch.testing.assert_close(moved, expected[name], rtol=1e-5, atol=1e-7)
        before = dense_deltas(model)
        record = run.step_end(model, optimizer, step)
        assert (record is not None) == (step == SQUEEZE_STEP)
        if record is not None:
            after = dense_deltas(model)
            for name, delta in before.items():
                assert relative_error(after[name], best_rank_k(delta.double(), TARGET).float()) < 1e-4
            assert set(record["ranks"].values()) == {TARGET} and record["modules_squeezed"] == len(before)
    assert [event["step"] for event in run.events] == [SQUEEZE_STEP]
    saved = run.resume_state()
    assert set(saved.source_ranks.values()) == {SOURCE} and set(saved.ranks.values()) == {TARGET}
    assert run.finish(model, optimizer, distributed=False) is None  # 2 steps after the squeeze: no verdict


def test_begin_before_prepare_is_one_clear_error():
    model = peft_llama(0, r=SOURCE, target_modules=["q_proj"])
    run = InSqueezeRun(InSqueezeOptions(target_rank=TARGET))
    with pytest.raises(
        LoraMonitorError, match=r"^InSqueezeRun: call prepare\(model, distributed\) before begin"
    ):
        run.begin(model, None, step=0, max_steps=10)
