"""What our trainer subclass adds over TRL's SFTTrainer (training/sft_trainer.py), on a tiny model: checkpoints
renamed into place whole, a resumed adapter back in the dtype it trained in, a checkpoint the Trainer cannot load
named as one line, and the adapter saved as PEFT writes it."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.errors import UserError
from qlora_trainer.training.sft_trainer import STAGING, qlora_sft_trainer


def _trainer(tiny_model_dir, root, **config):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                             init_lora_weights=False))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # as TRL trains a 4-bit base's adapters
    rows = Dataset.from_list([{"text": f"complaint {i}: the parcel arrived late"} for i in range(8)])
    args = SFTConfig(output_dir=str(root / "checkpoints"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                     logging_steps=1, report_to=[], use_cpu=True, max_length=32, dataset_text_field="text",
                     **config)
    return qlora_sft_trainer()(model=model, args=args, train_dataset=rows,
                               processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_adapter_names_are_the_trainable_parameters(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    assert trainer.adapter_names == list(_adapter(trainer))
    assert trainer.adapter_names and all("lora_" in name for name in trainer.adapter_names)


def test_checkpoints_are_renamed_into_place_whole_and_rotated(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, save_total_limit=1)
    trainer.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]  # no .partial, step 1 rotated away
    assert trainer.args.output_dir == str(root)
    state = json.loads((root / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (root / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_the_newest(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    save_optimizer = trainer._save_optimizer_and_scheduler

    def fail_at_step_2(output_dir):
        if trainer.state.global_step == 2:
            raise OSError(28, "No space left on device")
        save_optimizer(output_dir)

    trainer._save_optimizer_and_scheduler = fail_at_step_2
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name != STAGING) == ["checkpoint-1"]
    assert (root / "checkpoint-1" / "optimizer.pt").is_file()
    assert trainer.args.output_dir == str(root)  # the staging path does not outlive the save


def test_resume_brings_the_adapter_back_in_the_dtype_it_trained_in(tiny_model_dir, tmp_path):
    trained = _trainer(tiny_model_dir, tmp_path)
    trained.train()
    saved = _adapter(trained)
    resumed = _trainer(tiny_model_dir, tmp_path / "again")
    assert any(not torch.equal(resumed_value, saved[n]) for n, resumed_value in _adapter(resumed).items())
    resumed._load_from_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-2"))
    loaded = _adapter(resumed)
    assert {p.dtype for p in loaded.values()} == {torch.bfloat16}  # PEFT alone loads them as float32
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)


def test_a_checkpoint_the_trainer_cannot_load_is_named(tiny_model_dir, tmp_path):
    trained = _trainer(tiny_model_dir, tmp_path)
    trained.train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-1"
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    resumed = _trainer(tiny_model_dir, tmp_path / "again")
    with pytest.raises(UserError) as err:
        resumed._load_from_checkpoint(str(checkpoint))
    assert str(err.value).startswith(f"--resume: {checkpoint} will not load")
    assert f"delete {checkpoint}" in str(err.value)


def test_the_adapter_is_saved_as_peft_writes_it(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    # PEFT drops the adapter name from the keys it writes: one tensor per trainable parameter.
    assert keys == {n.replace(".default", "") for n in trainer.adapter_names}
