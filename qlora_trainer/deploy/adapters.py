"""One base, several adapters: load the 4-bit base once, attach named adapters, switch between them.

The multi-task setup the LoRA paper describes: adapters are a few MB each, so one GPU can hold a base and
many tasks and move between them without reloading anything.

    from qlora_trainer.deploy.adapters import AdapterSet

    models = AdapterSet("huggyllama/llama-7b")           # the 4-bit base, loaded once
    models.add("sql", "runs/sql-20261122-101500")          # a run directory or an adapter directory
    models.add("support", "runs/support-20261122-113000/adapter")
    models.use("sql")
    print(models.generate("List the users who signed up today."))
    models.use("support")
    print(models.generate("My order is late."))
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_trainer.config.recipe import ModelSection, QuantizationSection
from qlora_trainer.deploy.adapter_source import find_adapter, load_adapter_tokenizer
from qlora_trainer.deploy.generate import GenerateOptions, format_prompt, generate
from qlora_trainer.errors import UserError
from qlora_trainer.loading import base_fingerprint
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.adapter_shapes import check_adapter_matches


class AdapterSet:
    def __init__(self, base: str, quantization: QuantizationSection | None = None, device: str | None = None):
        self.base_section = ModelSection(name_or_path=base)
        self.quantization = quantization or QuantizationSection()
        self.device = device or model_lib.default_device()
        self.config = model_lib.load_config(self.base_section)
        self.base = model_lib.load_base_model(self.base_section, self.quantization, self.device)
        self.model = None  # the PeftModel, created with the first adapter
        self.tokenizers: dict = {}
        self.sources: dict = {}  # each adapter's AdapterSource: how its prompts are formatted

    @property
    def names(self) -> list[str]:
        return list(self.tokenizers)

    @property
    def active(self) -> str | None:
        return self.model.active_adapter if self.model is not None else None

    def add(self, name: str, path: str | Path) -> None:
        """Attach an adapter under `name`; refuses one trained on another base before loading it."""
        from peft import PeftModel

        if name in self.tokenizers:
            raise UserError(f"adapter name '{name}' is already used; pick another name")
        source = find_adapter(Path(path), self.base_section.name_or_path)
        check_adapter_matches(source.adapter_dir, self.config, self.base_section.name_or_path)
        base_fingerprint.check(source.adapter_dir, self.base_section, "adapter")
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, source.adapter_dir, adapter_name=name)
        else:
            self.model.load_adapter(source.adapter_dir, adapter_name=name)
        self.tokenizers[name] = load_adapter_tokenizer(source)
        self.sources[name] = source
        self.use(name)

    def use(self, name: str) -> None:
        if name not in self.tokenizers:
            raise UserError(f"no adapter named '{name}'; attached: {', '.join(self.names) or 'none'}")
        self.model.set_adapter(name)

    def generate(self, prompt: str, **options) -> str:
        """Complete `prompt` with the active adapter, formatted the way that adapter was trained."""
        if self.model is None:
            raise UserError("attach an adapter with add() first")
        tokenizer = self.tokenizers[self.active]
        text = format_prompt(prompt, self.sources[self.active], tokenizer)
        return generate(self.model, tokenizer, text, GenerateOptions(stream=False, **options))

    @torch.no_grad()
    def logits(self, prompt: str) -> torch.Tensor:
        """Next-token logits of the active adapter for `prompt` (used to check that switching works)."""
        tokenizer = self.tokenizers[self.active]
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.model.device)
        return self.model(input_ids=ids).logits[0].float().cpu()
