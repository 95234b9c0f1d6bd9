"""QLoRA: a 4-bit NF4 base (bitsandbytes) under a real PEFT LoRA, on the CPU.

Dominance must be measured against the dequantized base weight; the monitor, In-Squeeze and Post-Squeeze
must all run in one Trainer on the quantized model, and the compressed adapter must reload onto a fresh
4-bit base and give the trained model's outputs. Skipped only where bitsandbytes cannot run a 4-bit layer.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, training_args

from lora_monitor import BaseNormCache, compute_module_metrics, current_ranks, find_lora_modules

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("qlora_base")
    tiny_llama(0).save_pretrained(folder)
    try:  # bitsandbytes installs everywhere but runs 4-bit layers only on some platforms
        quantized_base(folder)(input_ids=torch.tensor([[1, 2, 3]]))
    except Exception as error:  # any failure here means "cannot run here", whatever bitsandbytes raises
        pytest.skip(f"bitsandbytes cannot run a 4-bit model here: {type(error).__name__}: {error}")
    return folder


def quantized_base(folder):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def qlora_model(folder, rank: int = 8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(quantized_base(folder), config)


def test_dominance_is_measured_against_the_dequantized_base(base_folder):
    import bitsandbytes as bnb

    model = qlora_model(base_folder)
    modules = find_lora_modules(model)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in modules)
    metrics = {record.name: record for record in compute_module_metrics(modules, BaseNormCache())}
    for module in modules:
        base = module.base_layer
        dequantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        delta = module.module.get_delta_weight("default").double()
        expected = torch.linalg.matrix_norm(delta, ord=2) / torch.linalg.matrix_norm(dequantized, ord=2)
        # σmax of the base comes from a few power iterations: within 2% by design.
        assert metrics[module.name].dominance == pytest.approx(float(expected), rel=2e-2)
        assert metrics[module.name].sigma_max == pytest.approx(
            float(torch.linalg.matrix_norm(delta, ord=2)), rel=1e-5
        )


@pytest.mark.slow
def test_monitor_in_squeeze_and_post_squeeze_on_a_qlora_model(base_folder, tmp_path, lm_dataset):
    from peft import PeftModel
    from transformers import Trainer

    from lora_monitor.callbacks import InSqueezeCallback, PostSqueezeCallback, SpectralMonitorCallback

    model = qlora_model(base_folder)
    monitor = SpectralMonitorCallback(every_n_steps=2)
    in_squeeze = InSqueezeCallback(target_rank=2, start_step=2, end_step=4)
    # Rank 2 keeps all of a rank-2 adapter: the compressed adapter must give exactly the trained outputs.
    post_squeeze = PostSqueezeCallback(candidate_ranks=[1, 2], min_variance_retention=1.0, compress=True)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=6, learning_rate=1e-3),
        train_dataset=lm_dataset,
        callbacks=[monitor, in_squeeze, post_squeeze],
    )
    trainer.train()

    assert monitor.latest and all(m.dominance is not None and m.dominance > 0 for m in monitor.latest)
    assert set(current_ranks(model).values()) == {2}
    assert in_squeeze.events, "In-Squeeze never squeezed the quantized model"
    assert post_squeeze.analysis is not None and post_squeeze.analysis.source_rank == 2

    compressed = tmp_path / "run" / "squeezed"
    assert (compressed / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(quantized_base(base_folder), compressed)
    assert post_squeeze.analysis.recommended_rank == 2
    # Every reloaded delta is the trained one. (Logits are not compared: bitsandbytes' CPU kernels repack a
    # 4-bit weight's quantization state on first use, so two loads of one base need not agree bit for bit.)
    trained = {m.name: m.module.get_delta_weight("default") for m in find_lora_modules(model)}
    again = {m.name: m.module.get_delta_weight("default") for m in find_lora_modules(reloaded)}
    assert again.keys() == trained.keys()
    for name, delta in trained.items():
        torch.testing.assert_close(again[name], delta, rtol=1e-5, atol=1e-7)
