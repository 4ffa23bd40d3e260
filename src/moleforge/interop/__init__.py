"""Other formats in and out: moleforge's own adapter format, PEFT LoRA, merged HuggingFace
models, MixLoRA and the official S'MoRE layer."""

from .own_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter, write_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_adapter", "write_adapter"]
