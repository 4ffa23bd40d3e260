"""PEFT's LoRA checkpoint format, read and written without PEFT installed.

A PEFT LoRA directory holds ``adapter_config.json`` (a ``LoraConfig`` as JSON, sorted keys) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight (r, d_in)`` and
``...lora_B.weight (d_out, r)`` per adapted module (metadata ``{"format": "pt"}``). A module's
update is ``Δy = scaling · (x Aᵀ) Bᵀ`` with ``scaling = alpha / r`` (``alpha / √r`` under
``use_rslora``); ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a key
matches the module name as PEFT matches it (``re.match(rf"(.*\\.)?({key})$", name)``, first key
in order), else from ``r`` / ``lora_alpha``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .atomic import atomic_write_many

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PeftLoRA", "ModuleLoRA", "read_peft_lora",
           "write_peft_lora", "pattern_value"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_MAGNITUDE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector$")

# LoraConfig fields whose non-default value changes the forward beyond ``scaling · B A x``.
_UNSUPPORTED: dict[str, str] = {
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "aLoRA's token-dependent activation",
    "use_qalora": "QA-LoRA's input pooling",
    "use_bdlora": "block-diagonal factors",
    "monteclora_config": "Monte Carlo sampling",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA's singular-value diagonal",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on raw parameters (fused MoE experts)",
    "trainable_token_indices": "trainable token embeddings",
    "modules_to_save": "fully trained modules",
}


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted module: ``Δy = scale · (x aᵀ) bᵀ``, ``a (r, d_in)``, ``b (d_out, r)``."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    rslora: bool
    magnitude: torch.Tensor | None = None
    """DoRA's ``m (d_out,)`` (``use_dora``): the adapted weight is ``m ⊙ V / ‖V‖``, ``V = W + scale·b a``."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass(frozen=True)
class PeftLoRA:
    """A PEFT LoRA adapter: ``modules`` by their name in the base model, and the raw config."""

    modules: dict[str, ModuleLoRA]
    config: dict[str, Any]
    path: Path


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for module ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; moleforge imports PEFT LoRA "
                              "adapters (peft_type 'LORA') only")
    bad = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append(f"bias = {config['bias']!r} (trained base biases)")
    if bad:
        raise CheckpointError(f"{path}: this LoRA uses {', '.join(bad)}, which a moleforge LoRA site does not "
                              "compute; only plain LoRA (optionally rsLoRA, rank/alpha patterns, "
                              "layers_to_transform) can be imported")


def _read_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            extra = " (adapter_model.bin pickles are not read: re-save with safetensors)" if p == w_path else ""
            raise CheckpointError(f"{p} is missing: a PEFT adapter directory holds {PEFT_CONFIG_NAME} and "
                                  f"{PEFT_WEIGHTS_NAME}{extra}")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(w_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory}: could not read the PEFT adapter: {e}") from None
    return config, tensors


def read_peft_lora(directory: str | os.PathLike, keys: Callable[[str], str | None] | None = None) -> PeftLoRA:
    """Read a PEFT LoRA directory (``keys``: each saved key's name as read, ``None`` to leave it out).

    Raises:
        CheckpointError: missing or damaged files, another PEFT method or LoRA variant, or a
            tensor that is not a LoRA factor (the message names it).
    """
    d = Path(directory)
    config, tensors = _read_files(d)
    if keys is not None:
        tensors = {new: t for k, t in tensors.items() if (new := keys(k)) is not None}
    _check_config(config, d)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        dora = _MAGNITUDE.match(key) if config.get("use_dora") else None
        if dora is not None and t.dim() == 1:
            magnitudes[dora["module"]] = t
            continue
        m = _KEY.match(key)
        if m is None or t.dim() != 2:
            raise CheckpointError(f"{d / PEFT_WEIGHTS_NAME}: tensor {key!r} {tuple(t.shape)} is not a linear LoRA "
                                  "factor (expected base_model.model.<module>.lora_A/lora_B.weight, 2-D)")
        pairs.setdefault(m["module"], {})[m["which"]] = t
    modules: dict[str, ModuleLoRA] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise CheckpointError(f"{d}: module {name!r} has factors {sorted(ab)} with shapes "
                                  f"{[tuple(v.shape) for v in ab.values()]}; expected lora_A (r, d_in), "
                                  "lora_B (d_out, r)")
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        if config.get("use_dora") and name not in magnitudes:
            raise CheckpointError(f"{d}: module {name!r} has no lora_magnitude_vector, which use_dora needs")
        modules[name] = ModuleLoRA(a=ab["A"], b=ab["B"], alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                                   magnitude=magnitudes.get(name))
    if not modules:
        raise CheckpointError(f"{d / PEFT_WEIGHTS_NAME} holds no LoRA factors")
    return PeftLoRA(modules=modules, config=config, path=d)


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def lora_config(ranks: dict[str, int], alphas: dict[str, float], *, fan_in_fan_out: bool,
                task_type: str | None, base_model: str | None, dropout: float = 0.0) -> dict[str, Any]:
    """A ``LoraConfig`` dict: global ``r`` / ``lora_alpha`` the most common values, the others as
    patterns anchored on the full module name (``^name``); ``lora_dropout`` = ``dropout``."""
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    rank_pattern = {f"^{re.escape(n)}": v for n, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {f"^{re.escape(n)}": v for n, v in sorted(alphas.items()) if v != alpha}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "revision": None,
        "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(ranks), "exclude_modules": None, "layers_to_transform": None,
        "layers_pattern": None, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_bias": False,
        "lora_dropout": dropout, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }


def write_peft_lora(directory: str | os.PathLike, config: dict[str, Any],
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    magnitudes: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (both to temporary files first,
so a failed write leaves the folder as it was).

    ``factors``: ``{module: (lora_A (r, d_in), lora_B (d_out, r))}``.
    """
    d = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous().clone()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous().clone()
    for name, m in (magnitudes or {}).items():  # DoRA
        tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = m.detach().to("cpu").contiguous().clone()
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write_many([(d / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                       (d / PEFT_CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))])
    return d
