"""moleforge's own adapter format: ``moleforge_config.json`` (the spec and the site
table) + ``moleforge_model.safetensors`` (every site tensor, keyed ``<module>.<param>``).
Never an ``adapter_config.json``: that name belongs to PEFT's formats.

Each save draws a random save id and records it in both files (``save_id`` in the config,
``moleforge_save_id`` in the safetensors metadata): a folder whose files come from two saves
(a save killed between its two renames) is refused on reading instead of loading mixed values."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from ..errors import CheckpointError
from .atomic import atomic_write_many

if TYPE_CHECKING:
    from ..integrations.handle import AdapterHandle

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "save", "write_adapter", "read_adapter"]

CONFIG_NAME = "moleforge_config.json"
WEIGHTS_NAME = "moleforge_model.safetensors"
FORMAT_VERSION = 1
SAVE_ID_KEY = "moleforge_save_id"
"""The safetensors metadata key of the save id (the config's ``save_id``)."""


def write_adapter(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files to temporary files, then move them into place (weights first): a failed
    save leaves the folder as it was; both files carry the same new save id."""
    d = Path(directory)
    save_id = uuid.uuid4().hex
    # safetensors forbids shared storage and non-contiguous tensors
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    text = json.dumps({"format_version": FORMAT_VERSION, **config, "save_id": save_id}, indent=2, sort_keys=True)
    # serialised here and written by us: safetensors' own save_file writes through a temporary file
    # of its own naming, which a killed save would leave behind unrecognised
    data = serialize(flat, metadata={"format": "pt", SAVE_ID_KEY: save_id})
    atomic_write_many([(d / WEIGHTS_NAME, lambda p: Path(p).write_bytes(data)),
                       (d / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))])
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
        with safe_open(str(w_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w_path} could not be read as safetensors: {e}") from None
    _check_same_save(d, config.get("save_id"), metadata.get(SAVE_ID_KEY))
    return config, tensors


def _check_same_save(directory: Path, config_id: str | None, weights_id: str | None) -> None:
    """Both files were written by one save (folders saved before save ids existed have neither)."""
    if config_id != weights_id:
        raise CheckpointError(
            f"{directory}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (save id {config_id!r} "
            f"against {weights_id!r}): a save into this folder was interrupted between its two files; "
            "save the adapter there again, or restore the folder from a copy")


def save(handle: AdapterHandle, directory: str | os.PathLike, *, tensors: dict[str, torch.Tensor] | None = None,
         all_ranks: bool = False) -> Path:
    """Write ``moleforge_config.json`` and ``moleforge_model.safetensors`` to ``directory``.

    Both files are written to temporary files first and then moved into place, one right after
    the other: a failed save leaves the folder as it was, and a save killed between the two moves
    leaves files that ``load`` refuses (they carry different save ids), never a mix it loads. The
    directory is created if needed.

    In a distributed run (``torch.distributed`` initialised) only global rank 0 writes, unless
    ``all_ranks`` (each node writing to its own disk); the others return the path having
    written nothing. Under DDP every rank holds the whole adapter, so rank 0 may call it alone.
    Under FSDP the adapter's tensors are sharded (``DTensor``): every rank must call it, since
    gathering them is a collective; rank 0 then writes the whole tensors. Nothing waits for the
    write: put a barrier after it before other ranks read the files.

    Args:
        tensors: the adapter's tensors (``handle.state_dict()``'s keys), when the caller has
            gathered them already (``save_pretrained`` given a full state dict).
    """
    if not handle.active:
        raise CheckpointError("this adapter was removed from its model; nothing to save")
    if tensors is None:
        tensors = {k: _whole(v) for k, v in handle.state_dict().items()}
    if not all_ranks and not _writer():
        return Path(directory)
    sites = {name: {"site": handle.site_of[name],
                    "params": {d.name: list(d.shape) for d in handle.graphs[name].params}}
             for name in handle.modules}
    _check_whole(tensors, sites)
    config = {"spec": handle.spec.model_dump(mode="json"),
              "base_model": type(handle.model).__name__,
              "sites": sites}
    return write_adapter(directory, config, tensors)


def _check_whole(tensors: dict[str, torch.Tensor], sites: dict[str, dict]) -> None:
    """Refuse to write a tensor whose shape is not the one its site declares: a shard or a
    partition (DeepSpeed ZeRO-3 leaves each rank's parameters empty outside their forward)."""
    for key, t in tensors.items():
        module, _, param = key.rpartition(".")
        want = sites.get(module, {}).get("params", {}).get(param)
        if want is not None and list(t.shape) != want:
            raise CheckpointError(
                f"{key} has shape {tuple(t.shape)}, the adapter declares {tuple(want)}: it is partitioned across "
                "processes (DeepSpeed ZeRO-3 or a model-parallel shard). Gather it before saving: under ZeRO-3 "
                "set stage3_gather_16bit_weights_on_model_save to true (the Trainer then passes the whole "
                "tensors), or call mf.save inside deepspeed.zero.GatheredParameters(handle.trainable_parameters())")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (FSDP2's ``DTensor``) gathered whole on every rank; others as they are."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _writer() -> bool:
    """Whether this process writes: global rank 0, or any process outside a distributed run."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
