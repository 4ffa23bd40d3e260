"""Export an adapter of MixLoRA's shape in the ``mixlora`` package's format (TUDB-Labs/MixLoRA,
0.2.x): the inverse of :func:`moleforge.interop.mixlora.import_mixlora`.

The package has one ``r``, ``lora_alpha``, ``use_rslora`` and ``lora_dropout`` for every LoRA, so
the adapter must be one ``ffn_block`` pool (top-k router with renormalised gates, a Switch load
balance or no aux loss) plus, optionally, plain LoRA sites on the attention projections, all with
the pool's rank, alpha, scaling and dropout. Anything else has no place in the format and is
refused, naming what differs.

A pool with ``magnitude: true`` (DoRA experts) is written with ``use_dora: true``; the package has one
``use_dora`` for every LoRA, so the attention LoRAs must then have ``magnitude: true`` too (and
otherwise not). The absolute magnitudes ``‖W‖ + M`` are written under each LoRA's
``magnitude_vector_`` key (``interop/mixlora_dora.py``, which says what the package's loader does
with them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..integrations.block_module import MoleforgeBlock
from ..integrations.handle import AdapterHandle
from ..integrations.sites import layer_of
from ..ir import ExpertFFN, ExpertHidden
from ..specs import ExpertPool, LoRA, SwitchLoadBalance, TopKRouter
from .atomic import atomic_write_many
from .mixlora_dora import MAGNITUDE_KEY, absolute_magnitudes, biased_dora, block_linear

__all__ = ["export_mixlora"]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# moleforge's block activations in transformers' ACT2FN names (what the package's act_fn reads)
_ACT_FN = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "quick_gelu": "quick_gelu"}


def _refuse(problem: str) -> CheckpointError:
    return CheckpointError(f"this adapter has no MixLoRA (mixlora package) form: {problem}; export it with "
                           "mf.save instead")


def _pool(handle: AdapterHandle) -> ExpertPool:
    blocks = [(i, s) for i, s in enumerate(handle.spec.sites) if s.scope == "ffn_block"]
    if len(blocks) != 1:
        raise _refuse(f"{len(blocks)} sites of scope 'ffn_block', the format has exactly one")
    i, site = blocks[0]
    pool = site.adapter
    router = pool.router
    if not isinstance(router, TopKRouter) or not router.renormalize or router.temperature != 1.0:
        raise _refuse(f"sites[{i}].adapter.router is not a top-k router with renormalised gates at temperature 1")
    if pool.capacity_factor is not None or pool.frozen_experts or pool.scaling not in ("alpha_over_rank", "rslora"):
        raise _refuse(f"sites[{i}].adapter has capacity_factor, frozen_experts or scaling {pool.scaling!r}")
    if any(not isinstance(a, SwitchLoadBalance) for a in pool.aux_losses) or len(pool.aux_losses) > 1:
        raise _refuse(f"sites[{i}].adapter.aux_losses {[a.kind for a in pool.aux_losses]}: at most one switch_lb")
    for j, other in enumerate(handle.spec.sites):
        if j == i:
            continue
        a = other.adapter
        same = (a.rank, a.alpha, a.scaling, a.dropout, a.magnitude) == \
            (pool.rank, pool.alpha, pool.scaling, pool.dropout, pool.magnitude) if isinstance(a, LoRA) else False
        if not same:
            raise _refuse(f"sites[{j}] is not a plain LoRA with the pool's rank, alpha, scaling, dropout and "
                          f"magnitude (use_dora = {pool.magnitude})")
    return pool


def _config(handle: AdapterHandle, pool: ExpertPool, targets: set[str]) -> dict:
    alpha = float(pool.alpha if pool.alpha is not None else pool.rank)
    if not alpha.is_integer():
        raise _refuse(f"alpha = {alpha}: the package reads an integer lora_alpha")
    router = pool.router
    config = {"bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": getattr(getattr(handle.model, "config", None), "_name_or_path", "") or "",
              "r": pool.rank, "lora_alpha": int(alpha), "lora_dropout": float(pool.dropout),
              "target_modules": sorted(targets), "routing_strategy": "mixlora", "num_experts": pool.experts,
              "top_k": router.k, "jitter_noise": float(router.jitter), "router_loss": bool(pool.aux_losses),
              "router_aux_loss_coef": pool.aux_losses[0].weight if pool.aux_losses else 0.001}
    if pool.scaling == "rslora":
        config["use_rslora"] = True
    if pool.magnitude:
        config["use_dora"] = True
    activations = {n.activation for g in handle.graphs.values() for n in g.nodes
                   if isinstance(n, (ExpertFFN, ExpertHidden))}
    if len(activations) == 1:
        config["act_fn"] = _ACT_FN[activations.pop()]
    return config


def _weights(handle: AdapterHandle, pool: ExpertPool) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The package's tensors (``mixlora.layers.{i}...``) and its target module names."""
    state = handle.state_dict()
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in handle.modules.items():
        i = layer_of(name)
        if isinstance(module, MoleforgeBlock):
            out[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = state[f"{name}.router_w"]
            for role, path in module.linears.items():
                if f"{name}.A_{role}" not in state:
                    continue
                proj = path.rsplit(".", 1)[-1]
                targets.add(proj)
                A, B = state[f"{name}.A_{role}"], state[f"{name}.B_{role}"]  # (E, r, in), (E, out, r)
                if A.shape[:2] != (pool.experts, pool.rank):
                    raise _refuse(f"{name}: {A.shape[0]} experts of rank {A.shape[1]}, the format has one count "
                                  f"and rank ({pool.experts}, {pool.rank}) for every layer")
                M = state.get(f"{name}.magnitude_{role}")
                M = None if M is None else absolute_magnitudes(block_linear(handle, name, path), M)  # (E, out)
                for e in range(A.shape[0]):
                    key = f"mixlora.layers.{i}.mlp.{proj}.experts.{e}"
                    out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = A[e], B[e]
                    if M is not None:
                        out[f"{key}.{MAGNITUDE_KEY}"] = M[e]
            continue
        proj = name.rsplit(".", 1)[-1]
        if proj not in _ATTENTION or ".self_attn." not in f".{name}":
            raise _refuse(f"{name} is not an attention projection ({', '.join(_ATTENTION)}) of a self_attn module")
        targets.add(proj)
        key = f"mixlora.layers.{i}.self_attn.{proj}"
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = state[f"{name}.A"], state[f"{name}.B"]
        if f"{name}.magnitude" in state:
            for problem in biased_dora(name, module.base_layer):
                raise _refuse(problem)
            out[f"{key}.{MAGNITUDE_KEY}"] = absolute_magnitudes(module.base_layer, state[f"{name}.magnitude"])
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, targets


def export_mixlora(handle: AdapterHandle, path: str | os.PathLike) -> Path:
    """Write ``handle`` as a MixLoRA adapter directory: ``adapter_config.json`` (``peft_type:
    "MIXLORA"``, the pool's ``lora_dropout`` included) and ``adapter_model.bin``, both written before
    either replaces an older file.

    Returns:
        The directory; ``mixlora.MixLoraModelForCausalLM`` and :func:`~moleforge.import_mixlora` read it.

    Raises:
        CheckpointError: the adapter is not of MixLoRA's shape (see the module docstring); the
            message names the site and what the format lacks.

    Example:
        >>> mf.export_mixlora(handle, "out/mixlora-adapter")  # doctest: +SKIP
    """
    pool = _pool(handle)
    weights, targets = _weights(handle, pool)
    config = _config(handle, pool, targets)
    path = Path(path)
    atomic_write_many([(path / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2))),
                       (path / "adapter_model.bin", lambda tmp: torch.save(weights, tmp))])
    return path
