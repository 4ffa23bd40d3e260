"""A plain HuggingFace model directory from a state dict: ``config.json`` + ``model.safetensors``,
or ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` past
``max_shard_size`` (the layout ``save_pretrained`` writes and ``from_pretrained`` reads).

Also the arithmetic of folding a delta into a base weight, in float64 then back to the
weight's dtype, for ``nn.Linear`` (``[out, in]``) and GPT-2 ``Conv1D`` (``[in, out]``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_write

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "parse_size", "fold_delta", "dedupe_shared", "shard",
           "write_hf_model"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or text such as ``"5GB"``, ``"200MB"``, ``"1GiB"``."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
    return int(float(m[1]) * _UNITS[m[2]])


def fold_delta(weight: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``W + ΔW`` in float64, cast back to ``W``'s dtype. ``delta`` is ``[out, in]``; a
    ``transposed`` weight is stored ``[in, out]`` (GPT-2 ``Conv1D``)."""
    d = delta.T if transposed else delta
    if tuple(d.shape) != tuple(weight.shape):
        raise ValueError(f"delta {tuple(d.shape)} does not fit weight {tuple(weight.shape)}")
    return (weight.detach().to(torch.float64) + d.to(device=weight.device, dtype=torch.float64)).to(weight.dtype)


def dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors that are the same storage view (tied weights: the input
    embedding is kept, the tied output head dropped, as ``save_pretrained`` does)."""
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _prepare(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def write_hf_model(directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                   json_files: dict[str, str], max_shard_size: int | str = "5GB") -> list[str]:
    """Write the weights (sharded past ``max_shard_size``), then ``json_files`` (``{file name: text}``,
    config.json last), each file atomically; remove shard files of an earlier export that the new
    one does not list. Returns the names written."""
    d = Path(directory)
    parts = shard(tensors, parse_size(max_shard_size))
    written: list[str] = []
    if len(parts) == 1:
        _save(d / WEIGHTS_NAME, parts[0])
        written.append(WEIGHTS_NAME)
    else:
        weight_map: dict[str, str] = {}
        for i, part in enumerate(parts, 1):
            fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            _save(d / fname, part)
            written.append(fname)
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _text(d / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_NAME)
    for name in sorted(json_files, key=lambda n: n == "config.json"):
        _text(d / name, json_files[name])
        written.append(name)
    _remove_stale(d, set(written))
    return written


def _save(path: Path, part: dict[str, torch.Tensor]) -> None:
    flat = {k: _prepare(v) for k, v in part.items()}
    atomic_write(path, lambda p: save_file(flat, p, metadata={"format": "pt"}))


def _text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def _is_weights_file(name: str) -> bool:
    return name in (WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD.match(name))


def _remove_stale(d: Path, keep: set[str]) -> None:
    for p in d.iterdir():
        if p.is_file() and _is_weights_file(p.name) and p.name not in keep:
            p.unlink()
