"""Import adapters in the format of the ``mixlora`` package (TUDB-Labs/MixLoRA, 0.2.x).

A MixLoRA adapter directory holds ``adapter_config.json`` (``peft_type: "MIXLORA"``) and a
pickled ``adapter_model.bin`` with the keys

    mixlora.layers.{i}.self_attn.{proj}.lora_{A,B}.weight           attention LoRA
    mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_{A,B}.weight       expert e's LoRA on an FFN linear
    mixlora.layers.{i}.mlp.moe_gate.weight                           the block's router (E, d)

``import_mixlora`` compiles the equivalent moleforge spec (an ``ffn_block`` expert pool plus
plain LoRA on the attention projections) and loads the tensors, so the model computes what
the package's own injection computes in evaluation mode. As in the package, every LoRA
(experts included) uses the top-level ``r`` / ``lora_alpha`` / ``use_rslora`` / ``lora_dropout``.

``lora_dropout`` becomes the pool's (and the attention LoRAs') ``dropout``, applied as the package
applies it in training (``mixlora/lora_linear.py``: ``lora_B(lora_A(dropout(x)))`` in every
``LoraLinear``, called per expert on that expert's tokens, ``model.py``): each expert's gate and up
LoRAs read their own dropout of the block input, its down LoRA a dropout of its hidden state
``act(gate) * up``, a fresh mask per LoRA call and routed token; the frozen projections and the
router read the undropped values (``ir/block_nodes.py``). Given the same keep factors, the
package's training forward and ours give the same logits (``tests/test_mixlora_import.py``).

``use_dora = true`` makes every LoRA a DoRA one, as the package does: the pool's experts get
``magnitude: true`` (DoRA on each expert's gate, up and down LoRAs, the frozen bias scaled too, as the
package's ``LoraLinear.apply_dora`` scales it) and the attention LoRAs too (PEFT's DoRA: the same in
evaluation on projections without a bias, and those with one are refused; in training with dropout its
``(c - 1) ⊙ x Wᵀ`` term reads the dropped input, as PEFT's does, where the package's reads ``x``). Their
magnitude tensors and what a file without them means: ``interop/mixlora_dora.py``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..compiler.compile import compile
from ..errors import CheckpointError
from ..integrations.block_module import MoleforgeBlock
from ..integrations.handle import AdapterHandle
from ..integrations.sites import layer_of
from ..ir import ExpertFFN, ExpertHidden
from ..passes import Pass
from ..specs import AdapterSpec, ExpertPool, LoRA, Site, SwitchLoadBalance, Target, TopKRouter
from .mixlora_dora import MAGNITUDE_KEY, biased_dora, block_linear, magnitude_offsets, package_scale

__all__ = ["import_mixlora", "mixlora_spec"]

# The projection names the package injects (mixlora/config.py ``lora_target_modules``).
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "dense", "qkv_proj")
_FFN = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "gate_up_proj")
# transformers' ACT2FN names the package accepts as ``act_fn``, in moleforge's vocabulary.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
                "quick_gelu": "quick_gelu"}


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no adapter_config.json; a MixLoRA adapter directory holds "
                              "adapter_config.json and adapter_model.bin") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    problems = []
    if config.get("peft_type") != "MIXLORA":
        problems.append(f"peft_type = {config.get('peft_type')!r}, expected 'MIXLORA'")
    if config.get("routing_strategy", "mixlora") != "mixlora":
        problems.append(f"routing_strategy = {config.get('routing_strategy')!r}: only 'mixlora' (top-k) is "
                        "defined in this format")
    if not isinstance(config.get("use_dora", False), bool):
        problems.append(f"use_dora = {config.get('use_dora')!r}: expected true or false")
    for key in ("r", "lora_alpha", "num_experts", "target_modules"):
        if key not in config:
            problems.append(f"missing field {key!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout = {dropout!r}: expected a probability in [0, 1)")
    if problems:
        raise CheckpointError(f"{file} is not a MixLoRA adapter config this importer reads:\n  - "
                              + "\n  - ".join(problems))
    return config


def _targets(config: dict[str, Any]) -> set[str]:
    t = config["target_modules"]
    names = {k for k, on in t.items() if on} if isinstance(t, dict) else set(t)
    return names & set(_ATTENTION + _FFN)


def _present(model: nn.Module, names: set[str]) -> set[str]:
    """The target names the package would inject into this model: ``self_attn.<name>`` for
    attention projections, ``mlp.<name>`` for FFN ones, where such modules exist."""
    found = set()
    for m, _ in model.named_modules():
        hit = re.search(r"(?:^|\.)(self_attn|mlp)\.(\w+)$", m)
        if hit and hit.group(2) in (_ATTENTION if hit.group(1) == "self_attn" else _FFN):
            found.add(hit.group(2))
    return names & found


def mixlora_spec(config: dict[str, Any], model: nn.Module | None = None) -> AdapterSpec:
    """The moleforge spec of a MixLoRA ``adapter_config.json`` (as a dict); with ``model``, limited
    to the projections the model has, as the package does."""
    names = _targets(config) if model is None else _present(model, _targets(config))
    scaling = "rslora" if config.get("use_rslora", False) else "alpha_over_rank"
    r, alpha, dropout = int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))
    dora = bool(config.get("use_dora", False))
    ffn = sorted(n for n in names if n in _FFN)
    attention = sorted(n for n in names if n in _ATTENTION)
    if not ffn:
        raise CheckpointError(f"target_modules {sorted(names)} names no FFN projection; MixLoRA experts live "
                              f"on {', '.join(_FFN)}")
    router = TopKRouter(k=int(config.get("top_k", 2)), renormalize=True,
                        jitter=float(config.get("jitter_noise", 0.0)))
    aux = [SwitchLoadBalance(weight=float(config.get("router_aux_loss_coef", 0.001)))] \
        if config.get("router_loss", True) else []
    sites = [Site(target=Target(modules=[rf"(.*\.)?layers\.\d+\.mlp\.({'|'.join(ffn)})"]), scope="ffn_block",
                  adapter=ExpertPool(experts=int(config["num_experts"]), rank=r, alpha=alpha, scaling=scaling,
                                     router=router, aux_losses=aux, dropout=dropout, magnitude=dora))]
    if attention:
        sites.append(Site(target=Target(modules=[rf"(.*\.)?layers\.\d+\.self_attn\.({'|'.join(attention)})"]),
                          adapter=LoRA(rank=r, alpha=alpha, scaling=scaling, dropout=dropout, magnitude=dora)))
    return AdapterSpec(name="mixlora-import", description="imported from a MixLoRA (mixlora package) adapter",
                       sites=sites)


def _check_activation(handle: AdapterHandle, config: dict[str, Any]) -> None:
    act = config.get("act_fn")
    if not act:
        return
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"act_fn = {act!r} is not one of {sorted(_ACTIVATIONS)}")
    for name, graph in handle.graphs.items():
        found = next((n.activation for n in graph.nodes if isinstance(n, (ExpertFFN, ExpertHidden))), None)
        if found is not None and found != _ACTIVATIONS[act]:
            raise CheckpointError(f"act_fn = {act!r} differs from the activation of the FFN block {name!r} "
                                  f"({found}); the experts would not compute the model's FFN")


def _tensors(handle: AdapterHandle, weights: dict[str, torch.Tensor], scale: float
             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state-dict keys filled from the package's keys; the package keys never read or missing.
    ``scale``: the package's LoRA scale (DoRA magnitudes absent from the file are computed with it)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key not in weights:
            missing.append(key)
            return None
        used.add(key)
        return weights[key]

    def peek(key: str) -> torch.Tensor | None:  # an optional tensor: a DoRA magnitude
        used.update([key] if key in weights else [])
        return weights.get(key)

    for name, graph in handle.graphs.items():
        i = layer_of(name)
        module = handle.modules[name]
        if isinstance(module, MoleforgeBlock):
            out[f"{name}.router_w"] = take(f"mixlora.layers.{i}.mlp.moe_gate.weight")
            for decl in graph.params:
                m = re.fullmatch(r"([AB])_(\w+)", decl.name)
                if m is None:
                    continue
                proj = module.linears[m.group(2)].rsplit(".", 1)[-1]
                parts = [take(f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_{m.group(1)}.weight")
                         for e in range(decl.shape[0])]
                out[f"{name}.{decl.name}"] = None if any(p is None for p in parts) else torch.stack(parts)
            out.update(_block_magnitudes(handle, name, i, graph, out, peek, scale))
        else:
            key = f"mixlora.layers.{i}.self_attn.{name.rsplit('.', 1)[-1]}"
            out[f"{name}.A"], out[f"{name}.B"] = take(f"{key}.lora_A.weight"), take(f"{key}.lora_B.weight")
            a, b = out[f"{name}.A"], out[f"{name}.B"]
            if any(d.name == "magnitude" for d in graph.params) and a is not None and b is not None:
                missing += biased_dora(name, module.base_layer)
                m = magnitude_offsets(module.base_layer, a[None], b[None], scale, [f"{key}.{MAGNITUDE_KEY}"], peek)
                out[f"{name}.magnitude"] = None if m is None else m[0]
    unread = sorted(set(weights) - used)
    if unread:
        warnings.warn(f"{len(unread)} tensor(s) of the adapter belong to no module of this model and are "
                      f"ignored, as the mixlora package ignores them: {unread[:5]}", stacklevel=3)
    return {k: v for k, v in out.items() if v is not None}, missing


def _block_magnitudes(handle: AdapterHandle, name: str, i: int, graph, out: dict[str, torch.Tensor | None],
                      peek, scale: float) -> dict[str, torch.Tensor | None]:
    """The DoRA magnitude offsets ``magnitude_<role> (E, out)`` of block ``name`` (``use_dora``), from the
    experts' factors already in ``out`` and the file's magnitudes (``interop/mixlora_dora.py``)."""
    found = {}
    for decl in graph.params:
        m = re.fullmatch(r"magnitude_(\w+)", decl.name)
        a, b = (out.get(f"{name}.{f}_{m.group(1)}") for f in "AB") if m else (None, None)
        if a is None or b is None:
            continue
        path = handle.modules[name].linears[m.group(1)]
        prefix = f"mixlora.layers.{i}.mlp.{path.rsplit('.', 1)[-1]}.experts"
        keys = [f"{prefix}.{e}.{MAGNITUDE_KEY}" for e in range(a.shape[0])]
        found[f"{name}.{decl.name}"] = magnitude_offsets(block_linear(handle, name, path), a, b, scale, keys, peek)
    return found


def import_mixlora(model: nn.Module, path: str | os.PathLike, *, passes: Sequence[Pass] | None = None
                   ) -> AdapterHandle:
    """Compile a MixLoRA adapter (``mixlora`` package format) into ``model``.

    Args:
        model: the base model the adapter was trained on (Llama, Qwen2, Mistral, Gemma, ...).
        path: a directory with ``adapter_config.json`` and ``adapter_model.bin``.
        passes: the pipeline (default: ``DEFAULT_PIPELINE``, which includes the block rewrites).

    Returns:
        The handle; the model's logits equal those of ``mixlora.inject_adapter_in_model``
        with the same adapter in evaluation mode.

    Raises:
        CheckpointError: the files are missing, not MixLoRA, or do not fit the model (every
            missing tensor is listed); the model is left as it was. Tensors of modules the
            model does not have are ignored with a warning, as the package ignores them.

    Example:
        >>> handle = mf.import_mixlora(model, "path/to/mixlora-adapter")  # doctest: +SKIP
    """
    path = Path(path)
    config = _read_config(path)
    if config.get("expert_lora"):
        warnings.warn(f"{path}: 'expert_lora' is ignored, as the mixlora package does: every expert uses the "
                      "top-level r and lora_alpha", stacklevel=2)
    try:
        weights = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no adapter_model.bin next to adapter_config.json") from None
    except Exception as e:  # noqa: BLE001 - a damaged or unsafe pickle
        raise CheckpointError(f"{path / 'adapter_model.bin'} cannot be read with weights_only=True: "
                              f"{e}") from None
    handle = compile(mixlora_spec(config, model), model, passes=passes)
    try:
        _check_activation(handle, config)
        tensors, problems = _tensors(handle, weights, package_scale(config))
        shapes = handle.state_dict()
        problems += [f"{k}: shape {tuple(v.shape)}, this model needs {tuple(shapes[k].shape)}"
                     for k, v in tensors.items() if tuple(v.shape) != tuple(shapes[k].shape)]
        if problems:
            raise CheckpointError(f"the MixLoRA adapter in {path} does not fit this "
                                  f"{type(model).__name__}:\n  - " + "\n  - ".join(problems[:20])
                                  + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
        handle.load_state_dict(tensors)
    except Exception:
        handle.remove()
        raise
    return handle
