"""The spectrum engine, the monitor and Post-Squeeze with everything on an accelerator (``cuda``, where the
machine has one) and, through the same code, on the CPU: the CPU case checks the test itself everywhere,
the ``cuda`` case runs in the sessions that have a GPU (``python -m pytest tests/device``)."""

from __future__ import annotations

import pytest
import torch
from dense_reference import best_rank_k, dense_deltas, lora_layers, relative_error
from peft import PeftModel
from tiny_models import peft_llama, tiny_llama, training_args
from transformers import Trainer

from lora_monitor.callbacks.monitor import SpectralMonitorCallback
from lora_monitor.callbacks.post_squeeze import PostSqueezeCallback
from lora_monitor.spectrum import effective_rank, lora_spectra, truncate_many

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_engine_on_the_device_matches_a_dense_float64_reference(device):
    generator = torch.Generator().manual_seed(3)
    shapes = [(96, 8, 64), (64, 8, 80), (48, 4, 40), (72, 8, 56)]  # two rank groups, one batch each on a GPU
    Bs = [torch.randn(m, r, generator=generator) for m, r, _ in shapes]
    As = [torch.randn(r, n, generator=generator) * torch.logspace(0, -2, r)[:, None] for _, r, n in shapes]
    spectra = lora_spectra([B.to(device) for B in Bs], [A.to(device) for A in As], 0.5)
    assert spectra.delta.device.type == device
    for index, (B, A) in enumerate(zip(Bs, As, strict=True)):
        reference = torch.linalg.svdvals(0.5 * B.double() @ A.double())[: A.shape[0]]
        found = spectra.delta[index, : A.shape[0]].cpu()
        assert torch.allclose(found, reference, rtol=1e-5, atol=1e-5 * float(reference[0]))
    # bf16 factors stay bf16 and on the device; each new pair is the best rank-k approximation of the stored one.
    ks = [3, 5, 2, 8]
    results = truncate_many([B.bfloat16().to(device) for B in Bs], [A.bfloat16().to(device) for A in As], ks)
    for B, A, k, result in zip(Bs, As, ks, results, strict=True):
        assert result.B.device.type == device and result.B.dtype == torch.bfloat16
        U, S, Vh = torch.linalg.svd(B.bfloat16().double() @ A.bfloat16().double(), full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        rebuilt = result.B.double().cpu() @ result.A.double().cpu()
        assert torch.linalg.matrix_norm(rebuilt - best) <= 2e-2 * float(S[0])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_on_the_device_with_the_monitor_and_post_squeeze(device, tmp_path, lm_dataset):
    model = peft_llama(0, init_lora_weights=True, r=8)
    monitor = SpectralMonitorCallback(every_n_steps=2)
    squeeze = PostSqueezeCallback(compress=True, candidate_ranks=[2, 4, 8], min_variance_retention=0.8)
    args = training_args(tmp_path / "run", max_steps=4, use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[monitor, squeeze])
    trainer.train()
    assert next(model.parameters()).device.type == device
    assert monitor.latest and monitor.monitor.latest.step == 4
    assert all(record.gradient_effective_rank is not None for record in monitor.latest)
    # The check made on the device against dense float64 SVDs of PEFT's own deltas and factors, on the CPU.
    model.to("cpu")
    trained, layers = dense_deltas(model), lora_layers(model)
    for record in monitor.latest:
        values = torch.linalg.svdvals(trained[record.name])[:8]
        assert record.sigma_max == pytest.approx(float(values[0]), rel=1e-6)
        assert record.effective_rank == pytest.approx(float(effective_rank(values)), rel=1e-5)
        B_values = torch.linalg.svdvals(layers[record.name].lora_B["default"].weight.detach().double())
        assert record.kappa_B == pytest.approx(float(B_values[0] / B_values[-1]), rel=1e-5)
    # The compressed adapter was written from the device and PEFT loads it: each delta the best rank-k one.
    assert squeeze.error is None
    rank = squeeze.analysis.recommended_rank
    assert rank < 8  # a real truncation
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "run" / "squeezed")
    written = dense_deltas(reloaded)
    assert written.keys() == trained.keys()
    for name, layer in lora_layers(reloaded).items():
        assert layer.r["default"] == rank
        assert relative_error(written[name], best_rank_k(trained[name], rank)) < 1e-5, name
