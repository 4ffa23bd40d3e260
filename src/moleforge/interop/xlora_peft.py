"""PEFT's X-LoRA folders in and out.

A folder PEFT saves (``XLoraModel`` under ``save_pretrained``) holds ``adapter_config.json``
(``peft_type`` ``"XLORA"``: the classifier's settings and ``adapters``, name -> LoRA folder),
``adapter_model.safetensors`` with the classifier alone
(``base_model.internal_xlora_classifier.layers.N.*``) and the experts as PEFT LoRA subfolders
``0``, ``1``, ... . PEFT loads it with ``PeftModel.from_pretrained(model, path, adapters={...})``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..integrations.handle import AdapterHandle
from ..integrations.xlora import CLASSIFIER, XLoRAHandle, xlora_router
from ..ir import eval_expr, expr_refs
from ..specs import XLoRARouter
from .atomic import atomic_write_many
from .peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PeftLoRA, lora_config, read_peft_lora, write_peft_lora

__all__ = ["is_xlora_folder", "read_xlora_folder", "export_xlora_peft"]

_PEFT_CLASSIFIER = "base_model.internal_xlora_classifier."
_PEFT_EXPERT = "base_model.lora_model.model."
_FIELDS = {"xlora_depth": "depth", "xlora_size": "size", "xlora_dropout_p": "dropout",
           "layerwise_scalings": "layerwise", "enable_softmax": "softmax", "softmax_temperature": "temperature",
           "top_k_lora": "top_k", "enable_softmax_topk": "softmax_topk", "scaling_pass_value": "scaling_pass_value",
           "global_scaling_weight": "global_scaling_weight"}


def _config(path: Path) -> dict | None:
    try:
        return json.loads((path / PEFT_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_xlora_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT X-LoRA folder (``peft_type`` ``"XLORA"``)."""
    config = _config(Path(path))
    return config is not None and config.get("peft_type") == "XLORA"


def _expert_key(key: str) -> str | None:
    """A key of an expert subfolder PEFT wrote as read: its LoRA factors (``base_model.lora_model.
    model.<module>.lora_A.weight``) as a LoRA folder names them; the rest it holds (the classifier,
    the base weights) left out."""
    if not key.endswith((".lora_A.weight", ".lora_B.weight")):
        return None
    return "base_model.model." + key[len(_PEFT_EXPERT):] if key.startswith(_PEFT_EXPERT) else key


def read_xlora_folder(path: str | os.PathLike) -> tuple[XLoRARouter, list[PeftLoRA], bool, dict[str, torch.Tensor]]:
    """``(router, experts, trainable experts, classifier tensors under the adapter's keys)``.

    The experts are the subfolders ``0``, ``1``, ... PEFT writes beside the config, else the
    folders its ``adapters`` names.

    Raises:
        CheckpointError: unreadable files, or an expert folder that is not there.
    """
    path = Path(path)
    config = _config(path)
    if config is None:
        raise CheckpointError(f"{path}: no readable {PEFT_CONFIG_NAME}")
    if config.get("scaling_pass_value") is None:
        config["scaling_pass_value"] = 1.0 / max(1, len(config.get("adapters") or {}))  # PEFT: None means 1/n
    router = XLoRARouter(**{ours: config[theirs] for theirs, ours in _FIELDS.items() if theirs in config})
    names = list((config.get("adapters") or {}).items())
    if not names:
        raise CheckpointError(f"{path}: the X-LoRA config names no adapters")
    experts = []
    for i, (name, where) in enumerate(names):
        sub = path / str(i)
        folder = sub if (sub / PEFT_CONFIG_NAME).exists() else Path(where)
        if not (folder / PEFT_CONFIG_NAME).exists():
            raise CheckpointError(f"{path}: expert {name!r} is neither in the subfolder {sub} nor at {where}; put "
                                  "the LoRA folder there")
        experts.append(read_peft_lora(folder, _expert_key))
    try:
        saved = load_file(str(path / PEFT_WEIGHTS_NAME))
    except Exception as e:  # noqa: BLE001 - name the file
        raise CheckpointError(f"{path / PEFT_WEIGHTS_NAME}: cannot read the X-LoRA classifier: {e}") from None
    tensors = {f"{CLASSIFIER}.{k[len(_PEFT_CLASSIFIER):]}": v for k, v in saved.items()
               if k.startswith(_PEFT_CLASSIFIER)}
    if not tensors:
        raise CheckpointError(f"{path / PEFT_WEIGHTS_NAME}: no {_PEFT_CLASSIFIER}* tensors (the X-LoRA classifier)")
    return router, experts, bool(config.get("use_trainable_adapters", False)), tensors


def export_xlora_peft(handle: AdapterHandle, path: str | os.PathLike, task_type: str | None = None) -> Path:
    """Write ``handle`` (an X-LoRA adapter) as a PEFT X-LoRA folder: the experts as PEFT LoRA
    subfolders ``0``, ``1``, ... (each expert's factors with its scale), the classifier, the config.
    Load it with ``PeftModel.from_pretrained(model, path, adapters={"0": path/0, ...})``.

    Raises:
        CheckpointError: the adapter has sites that are not X-LoRA pools (PEFT's X-LoRA model holds
            nothing else).
    """
    router = xlora_router(handle.spec)
    if not isinstance(handle, XLoRAHandle) or router is None:
        raise CheckpointError("export as PEFT X-LoRA needs an adapter whose sites all have an xlora router")
    others = [n for n in handle.modules if n not in handle.xlora_layers]
    if others:
        raise CheckpointError(f"PEFT's X-LoRA model holds X-LoRA pools only; sites {others[:3]} have other "
                              "adapters: export them separately (mf.export_peft on an adapter of those sites) or "
                              "mf.save the whole")
    out = Path(path)
    experts = handle.classifier.experts
    per_expert: list[dict] = [{} for _ in range(experts)]
    for name in handle.xlora_layers:
        graph = handle.plain_graphs[name]
        mix = next(n for n in graph.nodes if type(n).__name__ == "PoolMix")
        site = handle.modules[name].site
        A, B = (eval_expr(e, {r.name: getattr(site, r.name).detach() for r in expr_refs(e)}) for e in (mix.a, mix.b))
        for i in range(experts):
            per_expert[i][name] = (A[i], B[i], mix.scale)
    folders = {}
    conv1d = any(not isinstance(handle.modules[n].base_layer, nn.Linear) for n in handle.xlora_layers)
    for i, factors in enumerate(per_expert):
        ranks = {n: int(a.shape[0]) for n, (a, _, _) in factors.items()}
        alphas = {n: s * ranks[n] for n, (_, _, s) in factors.items()}
        config = lora_config(ranks, alphas, fan_in_fan_out=conv1d, task_type=task_type, base_model=None)
        write_peft_lora(out / str(i), config, {n: (a, b) for n, (a, b, _) in factors.items()})
        folders[str(i)] = str(out / str(i))
    config = {"peft_type": "XLORA", "task_type": task_type, "hidden_size": _hidden(handle),
              "adapters": folders, "use_trainable_adapters": not handle.spec.sites[0].adapter.frozen_experts,
              "base_model_name_or_path": None, "revision": None, "inference_mode": True,
              **{theirs: getattr(router, ours) for theirs, ours in _FIELDS.items()}}
    tensors = {f"{_PEFT_CLASSIFIER}{k}": v.detach().to("cpu").contiguous().clone()
               for k, v in handle.classifier.state_dict().items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write_many([(out / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                       (out / PEFT_CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))])
    return out


def xlora_not_mergeable(handle: XLoRAHandle) -> str:
    """Why an X-LoRA adapter does not merge into the base weights."""
    sites = handle.xlora_layers
    return (f"cannot merge into the base weights: the {len(sites)} X-LoRA sites ({sites[0]}, ...; router 'xlora') "
            "mix their experts with scalings the classifier computes per token from the base model's hidden states, "
            "so no fixed weight equals them. Export as a PEFT X-LoRA folder with mf.export_peft(handle, path) "
            "(moleforge export --peft OUT), or keep the adapter with mf.save(handle, path).")


def _hidden(handle: XLoRAHandle) -> int:
    return int(handle.classifier.layers[0].weight.shape[1])

