"""Import checkpoints of the official S'MoRE code (ZimpleX/SMoRE-LLM: its PEFT fork,
``peft_type = "HIER_MOE"``, layer ``SMoREFFN``) as a moleforge adapter whose outputs equal
the official layer's.

An official checkpoint is the fork's ``adapter_model`` (``.safetensors`` or ``.bin``) with
keys such as ``base_model.model.model.layers.0.mlp.up_proj.moe_A.0`` (as saved: the adapter
name removed) or ``...up_proj.moe_A.default.0`` (a live ``state_dict``), and the fields of
its ``HieRMoEConfig`` (``adapter_config.json``). Name mapping per adapted module, ``l`` the
pool (0 = leaves):

=====================================  ====================
official                               moleforge
=====================================  ====================
``moe_downproj_x.weight`` / ``.bias``  ``down_w`` / ``down_b``
``moe_gate.{l}.keys``                  ``keys{l}``
``moe_gate.{l}.mlp.0.weight/.bias``    ``query{l}_w1`` / ``query{l}_b1``
``moe_gate.{l}.mlp.2.weight/.bias``    ``query{l}_w2`` / ``query{l}_b2``
``moe_gate.{l}.weight_noise.weight``   ``noise{l}`` (noisy_topk)
``moe_A.{l}`` / ``moe_A_bias.{l}``     ``A{l}`` / ``A{l}_bias``
``moe_B.{l}`` / ``moe_B_bias.{l}``     ``B{l}`` / ``B{l}_bias``
``moe_W.{l}`` / ``moe_W_bias.{l}``     ``W{l}`` / ``W{l}_bias`` (l >= 1)
``moe_W_final`` / ``moe_W_final_bias``  ``proj_w`` / ``proj_b``
=====================================  ====================
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..compiler.compile import compile
from ..errors import CheckpointError, MoleforgeError
from ..integrations.handle import AdapterHandle
from ..specs import (
    AdapterSpec,
    CV2ImportanceLoad,
    ResidualTree,
    Site,
    SwitchLoadBalance,
    Target,
    TreeLevel,
    TreeRouter,
)

__all__ = ["import_smore_official", "smore_spec_from_official", "official_name"]

_MOE = ("moe_downproj_x", "moe_gate", "moe_A", "moe_B", "moe_W", "moe_W_final", "moe_A_bias", "moe_B_bias",
        "moe_W_bias", "moe_W_final_bias", "moe_expert_act_param")
_INNER = {"weight", "bias", "keys", "mlp", "weight_noise"}
_PEFT_PREFIX = "base_model.model."
_ACTS = ("tanh", "relu", "identity")


def official_name(name: str) -> str:
    """The official key (after the module path, adapter name removed) of a moleforge
    tree parameter name, e.g. ``query1_w1`` -> ``moe_gate.1.mlp.0.weight``."""
    fixed = {"down_w": "moe_downproj_x.weight", "down_b": "moe_downproj_x.bias",
             "proj_w": "moe_W_final", "proj_b": "moe_W_final_bias"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(keys|noise|query|A|B|W)(\d+)(_bias|_w1|_b1|_w2|_b2)?", name)
    if m is None:
        raise KeyError(f"{name!r} is not a residual-tree parameter")
    kind, l, tail = m.group(1), m.group(2), m.group(3) or ""
    if kind == "keys":
        return f"moe_gate.{l}.keys"
    if kind == "noise":
        return f"moe_gate.{l}.weight_noise.weight"
    if kind == "query":
        layer, part = {"_w1": ("0", "weight"), "_b1": ("0", "bias"), "_w2": ("2", "weight"),
                       "_b2": ("2", "bias")}[tail]
        return f"moe_gate.{l}.mlp.{layer}.{part}"
    return f"moe_{kind}{tail}.{l}"


# ---- reading ------------------------------------------------------------------------------

def _read_config(config: Any) -> dict:
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "adapter_config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the official config {path}: {e}") from None
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "__dict__"):
        return dict(vars(config))
    raise CheckpointError(f"config must be a dict of HieRMoEConfig fields, a config object or a path to "
                          f"adapter_config.json; got {type(config).__name__}")


def _read_tensors(src: Any) -> dict[str, torch.Tensor]:
    if isinstance(src, Mapping):
        return dict(src)
    path = Path(src)
    if path.is_dir():
        found = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).exists()]
        if not found:
            raise CheckpointError(f"{path} holds no adapter_model.safetensors or adapter_model.bin")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(f"cannot read the official checkpoint {path}: {e}") from None


def _split(key: str) -> tuple[str, str, str | None] | None:
    """``key`` -> (module path, official name without adapter, adapter name) or ``None``
    for keys that are not S'MoRE parameters (base weights, anything else)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _MOE:
            rest = parts[i + 1:]
            adapter = None
            if rest and not rest[0].isdigit() and rest[0] not in _INNER:
                adapter, rest = rest[0], rest[1:]
            prefix = ".".join(parts[:i])
            prefix = prefix[len(_PEFT_PREFIX):] if prefix.startswith(_PEFT_PREFIX) else prefix
            return prefix, ".".join([part] + rest), adapter
    return None


def _group(tensors: Mapping[str, torch.Tensor],
           adapter_name: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {official name: tensor}}`` of one adapter."""
    split = {k: _split(k) for k in tensors}
    names = {s[2] for s in split.values() if s is not None and s[2] is not None}
    if adapter_name is None and len(names) > 1:
        raise CheckpointError(f"the checkpoint holds several adapters {sorted(names)}; pass adapter_name=")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, s in split.items():
        if s is None or (adapter_name is not None and s[2] not in (None, adapter_name)):
            continue
        out.setdefault(s[0], {})[s[1]] = tensors[key]
    if not out:
        raise CheckpointError("no S'MoRE parameters (keys with moe_A, moe_B, moe_gate, ...) in the "
                              "checkpoint")
    return out


# ---- config -> spec -----------------------------------------------------------------------

def _need(cfg: dict, field: str, allowed: tuple, default: Any) -> Any:
    value = cfg.get(field, default)
    if value not in allowed:
        raise CheckpointError(f"HieRMoEConfig.{field} = {value!r} is not supported; moleforge imports "
                              f"{', '.join(map(repr, allowed))}")
    return value


def smore_spec_from_official(config: Any, d_in: int | None = None) -> ResidualTree:
    """The :class:`ResidualTree` (``conventions = "official"``) an official ``HieRMoEConfig``
    describes. ``d_in`` is needed only when ``dim_downproj_x <= 0`` (no down-projection width)."""
    cfg = _read_config(config)
    _need(cfg, "moe_arch", ("smore",), "smore")
    _need(cfg, "gate_arch", ("mlp",), "mlp")
    _need(cfg, "is_shared_expert_pool", (False,), False)
    gate = _need(cfg, "gate_type", ("switch", "dense", "noisy_topk"), "noisy_topk")
    act = _need(cfg, "expert_act_fn", _ACTS, "relu")
    qact = _need(cfg, "gate_act_fn", _ACTS, "relu")
    position = _need(cfg, "activation_position", ("all", "child", "child_v2"), "all")
    try:
        s, f, r = list(cfg["num_experts"]), list(cfg["num_active"]), list(cfg["expert_dims"])
        g = list(cfg.get("gate_dims") or [32] * len(s))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"HieRMoEConfig needs num_experts, num_active and expert_dims lists "
                              f"({e})") from None
    alpha = cfg.get("lora_alpha")
    alpha = [None] * len(s) if alpha is None else list(alpha)
    if not len(s) == len(f) == len(r) == len(g) == len(alpha):
        raise CheckpointError(f"HieRMoEConfig lists differ in length: num_experts {s}, num_active {f}, "
                              f"expert_dims {r}, gate_dims {g}, lora_alpha {cfg.get('lora_alpha')}")
    m = cfg.get("dim_downproj_x", 32)
    down = d_in if m is None or m <= 0 else int(m)
    weight = float(cfg.get("balance_loss_weight", 1e-2))
    aux = {"switch": [SwitchLoadBalance(weight=weight)], "noisy_topk": [CV2ImportanceLoad(weight=weight)],
           "dense": []}[gate]
    levels = [TreeLevel(experts=s[l], rank=r[l], fanout=None if gate == "dense" else f[l], alpha=alpha[l],
                        key_dim=g[l]) for l in range(len(s))]
    try:
        return ResidualTree(levels=levels, activation=act, activation_position=position, bias=True,
                            router=TreeRouter(gate=gate, down_dim=down, key_dim=g[0], query_activation=qact),
                            conventions="official", aux_losses=aux)
    except MoleforgeError as e:
        raise CheckpointError(f"the official config does not describe a valid tree: {e}") from None


# ---- import -------------------------------------------------------------------------------

def _resolve(model: nn.Module, path: str, module: str | None) -> str:
    if path == "":
        if module is not None:
            return module
        linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        if len(linears) != 1:
            raise CheckpointError("the checkpoint's keys carry no module path (e.g. 'moe_A.default.0') "
                                  f"and the model has {len(linears)} linears; pass "
                                  "module='name.of.the.linear'")
        return linears[0]
    return path


def import_smore_official(model: nn.Module, path_or_state_dict: Any, config: Any, *,
                          adapter_name: str | None = None, module: str | None = None) -> AdapterHandle:
    """Compile the S'MoRE adapter of an official checkpoint into ``model`` and load its tensors.

    Args:
        model: the base model the checkpoint was trained on (e.g. a HF ``LlamaForCausalLM``), or
            any module holding the adapted linears.
        path_or_state_dict: a directory with ``adapter_model.safetensors``/``.bin``, such a
            file, or a ``{key: tensor}`` dict; keys may carry the PEFT prefix
            ``base_model.model.`` and the adapter name (``.default``). Keys of anything but
            S'MoRE parameters are ignored.
        config: the ``HieRMoEConfig`` fields (a dict, the config object, or the path of
            ``adapter_config.json`` or of its directory).
        adapter_name: which adapter, when the keys hold several.
        module: the model's linear for keys with no module path (a single-layer state dict).

    Returns:
        the :class:`AdapterHandle`; its spec is the official config as a ``ResidualTree`` with
        ``conventions = "official"``. On any error the model is left untouched.

    Raises:
        CheckpointError: unreadable files, unsupported config fields, modules the model lacks,
            missing, unexpected or mis-shaped tensors (all listed).
    """
    cfg = _read_config(config)
    groups = _group(_read_tensors(path_or_state_dict), adapter_name)
    tensors = {_resolve(model, path, module): ts for path, ts in groups.items()}
    missing = sorted(n for n in tensors if n not in dict(model.named_modules()))
    if missing:
        raise CheckpointError(f"the checkpoint adapts modules this {type(model).__name__} lacks: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    sites = _sites(model, cfg, sorted(tensors))
    handle = compile(AdapterSpec(name="smore_official", sites=sites), model)
    problems = []
    own = handle.state_dict()
    for name, ts in tensors.items():
        wanted = {official_name(d.name): f"{name}.{d.name}" for d in handle.graphs[name].params}
        for key, mine in wanted.items():
            if key not in ts:
                problems.append(f"{name}: {key} is missing (needed as {mine.rsplit('.', 1)[1]})")
            elif tuple(ts[key].shape) != tuple(own[mine].shape):
                problems.append(f"{name}: {key} has shape {tuple(ts[key].shape)}, the config gives "
                                f"{tuple(own[mine].shape)}")
        problems += [f"{name}: unexpected {key}" for key in sorted(set(ts) - set(wanted))]
    if problems:
        handle.remove()
        raise CheckpointError("the official checkpoint does not match its config:\n  - "
                              + "\n  - ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    handle.load_state_dict({f"{name}.{d.name}": tensors[name][official_name(d.name)]
                            for name in tensors for d in handle.graphs[name].params})
    for mod in handle.modules.values():
        mod.train(mod.base_layer.training)  # an eval-mode model gets eval-mode (noise-free) gates
    return handle


def _sites(model: nn.Module, cfg: dict, names: list[str]) -> list[Site]:
    """One site per distinct tree (the down-projection width may follow ``d_in``)."""
    by_tree: dict[str, tuple[ResidualTree, list[str]]] = {}
    for name in names:
        tree = smore_spec_from_official(cfg, getattr(model.get_submodule(name), "in_features", None))
        key = tree.model_dump_json()
        by_tree.setdefault(key, (tree, []))[1].append(name)
    return [Site(target=Target(modules=[re.escape(n) for n in mods]), adapter=tree)
            for tree, mods in by_tree.values()]
