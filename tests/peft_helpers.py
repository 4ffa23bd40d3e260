"""PEFT adapters made by PEFT itself on the tiny models, for import/export tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from models import batch, tiny


def make_peft_adapter(arch: str, path: Path, seed: int, **config) -> Path:
    """Train-free PEFT LoRA (``init_lora_weights=False``: A and B both random) saved to ``path``."""
    model = tiny(arch)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(str(path))
    return path


def peft_logits(arch: str, path: Path) -> torch.Tensor:
    """Logits of a fresh tiny ``arch`` with the PEFT adapter loaded by PEFT."""
    model = PeftModel.from_pretrained(tiny(arch), str(path)).eval()
    with torch.no_grad():
        return model(batch()).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch()).logits
