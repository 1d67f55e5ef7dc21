"""qlora-trainer: fine-tune 7B-70B language models on one consumer GPU with QLoRA, and know first whether it fits."""

__version__ = "0.1.0"
