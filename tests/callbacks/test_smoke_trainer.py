import pytest
from tiny_models import peft_llama, training_args


@pytest.mark.slow
def test_trainer_runs(tmp_path, lm_dataset):
    from transformers import Trainer

    model = peft_llama(init_lora_weights=True)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=lm_dataset)
    trainer.train()
    assert trainer.state.global_step == 3
