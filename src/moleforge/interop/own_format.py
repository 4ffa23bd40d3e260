"""moleforge's own adapter format: ``moleforge_config.json`` (the spec and the site
table) + ``moleforge_model.safetensors`` (every site tensor, keyed ``<module>.<param>``).
Never an ``adapter_config.json``: that name belongs to PEFT's formats."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .atomic import atomic_write

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "write_adapter", "read_adapter"]

CONFIG_NAME = "moleforge_config.json"
WEIGHTS_NAME = "moleforge_model.safetensors"
FORMAT_VERSION = 1


def write_adapter(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files atomically (weights first, so a config never points at missing weights)."""
    d = Path(directory)
    # safetensors forbids shared storage and non-contiguous tensors
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(d / WEIGHTS_NAME, lambda p: save_file(flat, p, metadata={"format": "pt"}))
    text = json.dumps({"format_version": FORMAT_VERSION, **config}, indent=2, sort_keys=True)
    atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return d


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read both files; a missing or damaged file gives a ``CheckpointError`` naming it."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (this looks like a PEFT adapter: use mf.from_peft)" if (d / "adapter_config.json").exists() else ""
            raise CheckpointError(f"{p} is missing: a moleforge adapter directory holds {CONFIG_NAME} and "
                                  f"{WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has format_version {config.get('format_version')!r}; this moleforge "
                              f"reads version {FORMAT_VERSION}")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w_path} could not be read as safetensors: {e}") from None
    return config, tensors
