"""FFN-block sites (``scope: "ffn_block"``): find the MLP blocks a site targets, trace each
with ``torch.fx``, build its IR (:class:`~moleforge.ir.ExpertFFN` over the block's frozen
weights, referenced as frozen inputs), run the block rewrites and build the routed modules.

A block is the smallest module holding one layer's FFN linears (``model.layers.i.mlp``,
``transformer.h.i.mlp``); BERT's FFN, split over ``intermediate`` and ``output``, is traced
through the layer method that calls both. The site's targets say which of the block's
linears carry expert LoRAs; the block's structure (gate/up/down, activation) comes from
its graph.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn

from ..backends.torch_fx.init import ParamStore
from ..backends.torch_fx.lower import lower
from ..errors import InjectionError, MoleforgeError
from ..integrations.block_module import MoleforgeBlock, build_block_module, frozen_names
from ..integrations.ffn_trace import BlockLinear, TracedBlock, trace_block
from ..integrations.inject import AuxCollector, linear_dims
from ..integrations.sites import ROLE_PATTERNS, layer_of, num_layers
from ..ir import AuxLoss, ExpertFFN, ExpertLinear, Graph, ParamDecl, ParamRef, verify
from ..passes import Pass, run_pipeline
from ..passes.hoist_frozen_down import hoist_frozen_down
from ..passes.share_frozen_projections import share_frozen_projections
from ..specs import AdapterSpec, ExpertPool, PerExpert, Site, lora_scale
from .build import SiteShape, _Builder, _flat_router

__all__ = ["BLOCK_PIPELINE", "ResolvedBlock", "resolve_blocks", "build_block_graph", "prepare_blocks",
           "make_block_modules", "count_block_parameters"]

BLOCK_PIPELINE: tuple[Pass, ...] = (share_frozen_projections, hoist_frozen_down)
"""The block rewrites run by default: frozen gate/up projections once, frozen down hoisted."""

_FFN_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class ResolvedBlock:
    """One FFN block a site routes: ``name`` is the module replaced by the routed block."""

    name: str
    site_index: int
    layer: int | None
    traced: TracedBlock
    roles: tuple[str, ...]
    """The block linears carrying expert LoRAs."""
    shape: SiteShape


def _targeted(site: Site, name: str) -> bool:
    t = site.target
    if any(re.search(rf"(^|\.){p}$", name) for r in t.roles for p in ROLE_PATTERNS[r]):
        return True
    return any(re.fullmatch(p, name) for p in t.modules)


def _is_ffn(name: str) -> bool:
    return any(re.search(rf"(^|\.){p}$", name) for r in _FFN_ROLES for p in ROLE_PATTERNS[r])


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _check_pool(i: int, site: Site) -> ExpertPool:
    a = site.adapter
    if not isinstance(a, ExpertPool):
        raise InjectionError(f"sites[{i}]: scope 'ffn_block' routes whole FFN blocks and needs an adapter "
                             f"of kind 'pool' (got {a.kind!r}); a plain LoRA on every FFN linear is scope "
                             "'linear'")
    if not isinstance(a.down, PerExpert) or a.up != "per_expert" or a.shared_expert is not None:
        raise InjectionError(f"sites[{i}].adapter: FFN-block experts have their own A and B on each linear; "
                             "shared factors and shared experts are not defined for scope 'ffn_block'")
    return a


def _groups(spec: AdapterSpec, i: int, model: nn.Module) -> dict[object, tuple[list[str], list[str]]]:
    """Per layer: (targeted linears, every FFN linear of the layer)."""
    site = spec.sites[i]
    groups: dict[object, tuple[list[str], list[str]]] = {}
    for name, module in model.named_modules():
        if linear_dims(module) is None:
            continue
        layer = layer_of(name)
        key = layer if layer is not None else name.rpartition(".")[0]
        hit = _targeted(site, name) and (site.target.layers is None or layer in site.target.layers)
        if hit or _is_ffn(name):
            targets, ffn = groups.setdefault(key, ([], []))
            ffn.append(name)
            if hit:
                targets.append(name)
    return {k: v for k, v in groups.items() if v[0]}


def _override(site: Site, layer: int | None, n_layers: int) -> tuple[int | None, int | None]:
    experts = rank = None
    for ov in site.target.overrides:
        if layer is not None and ov.covers(layer, n_layers):
            experts = ov.experts if ov.experts is not None else experts
            rank = ov.rank if ov.rank is not None else rank
    return experts, rank


def resolve_blocks(spec: AdapterSpec, model: nn.Module, claimed: frozenset[str] | set[str] = frozenset()
                   ) -> list[ResolvedBlock]:
    """Every FFN block an ``ffn_block`` site asks for, traced and recognised.

    Args:
        claimed: module names already adapted by ``linear`` sites (they cannot also be in a block).

    Raises:
        InjectionError: a site matches no FFN linear, a block does not trace, a targeted module
            is not one of its block's linears, or a module is claimed twice.
    """
    for name, module in model.named_modules():
        if isinstance(module, MoleforgeBlock):
            raise InjectionError(f"module {name!r} already is a routed FFN block; call remove() on its "
                                 "handle before compiling another spec into this model")
    out: list[ResolvedBlock] = []
    n_layers = num_layers(model)
    taken: dict[str, int] = {}
    for i, site in enumerate(spec.sites):
        if site.scope != "ffn_block":
            continue
        pool = _check_pool(i, site)
        groups = _groups(spec, i, model)
        if not groups:
            raise InjectionError(f"sites[{i}] (ffn_block) matches no FFN linear of {type(model).__name__}; "
                                 "check the roles, module patterns and layers")
        for key, (targets, ffn) in groups.items():
            tb = trace_block(model, _common_parent(sorted(set(targets + ffn))), sorted(set(targets + ffn)))
            by_name = {tb.full_name(r): r for r in tb.linears}
            stray = [t for t in targets if t not in by_name]
            if stray:
                raise InjectionError(f"sites[{i}] targets {stray}, which are not linears of the FFN block "
                                     f"{tb.name!r} (its linears: {by_name})")
            for t in by_name:
                if t in claimed or t in taken:
                    who = "a 'linear' site" if t in claimed else f"sites[{taken[t]}]"
                    raise InjectionError(f"module {t!r} is in the FFN block of sites[{i}] and also adapted "
                                         f"by {who}; a linear takes one adapter: narrow the targets")
                taken[t] = i
            layer = key if isinstance(key, int) else None
            experts, rank = _override(site, layer, n_layers)
            shape = SiteShape(label=tb.name, d_in=tb.d_model, d_out=tb.linears["down"].d_out,
                              experts=experts or pool.experts, rank=rank or pool.rank)
            out.append(ResolvedBlock(name=tb.name, site_index=i, layer=layer, traced=tb,
                                     roles=tuple(by_name[t] for t in targets), shape=shape))
    return out


def build_block_graph(pool: ExpertPool, linears: dict[str, BlockLinear], activation: str,
                      roles: Sequence[str], shape: SiteShape, origin: str = "adapter") -> Graph:
    """The plain IR of ``pool`` as experts over an FFN block with ``linears`` (``gate``, ``up``,
    ``down``) and ``activation``: a router, one :class:`~moleforge.ir.ExpertFFN` and the pool's
    aux losses. ``A_<role> (E, r, d_in)`` and ``B_<role> (E, d_out, r)`` on the linears in
    ``roles``; frozen inputs ``W_<role>`` and ``b_<role>``."""
    b = _Builder(shape)
    E, r = shape.experts or pool.experts, shape.rank or pool.rank
    route = _flat_router(b, pool.router, E, origin)
    k = pool.router.k
    scale = lora_scale(pool.alpha, r, pool.scaling, active=(k or E) * r, total=E * r)
    frozen: list[ParamDecl] = []
    experts: dict[str, ExpertLinear] = {}
    for role, info in linears.items():
        w_name, b_name = frozen_names(role)
        frozen.append(ParamDecl(name=w_name, shape=(info.d_out, info.d_in), init="frozen", trainable=False))
        bias = None
        if info.bias:
            frozen.append(ParamDecl(name=b_name, shape=(info.d_out,), init="frozen", trainable=False))
            bias = ParamRef(b_name, (info.d_out,))
        a = up = None
        if role in roles:
            a = b.param(f"A_{role}", (E, r, info.d_in), "kaiming", fan_in=info.d_in)
            up = b.param(f"B_{role}", (E, info.d_out, r), "up")
        experts[role] = ExpertLinear(weight=ParamRef(w_name, (info.d_out, info.d_in)), bias=bias, a=a, b=up,
                                     scale=scale)
    out = b.add(ExpertFFN(id="experts", src="x", routing=route, up=experts["up"], gate=experts.get("gate"),
                          down=experts["down"], activation=activation, origin=origin))  # type: ignore[arg-type]
    for j, aux in enumerate(pool.aux_losses):
        b.aux.append(b.add(AuxLoss(id=f"aux{j}", routing=route, kind=aux.kind, weight=aux.weight,
                                   delta=getattr(aux, "delta", 0.0), groups=getattr(aux, "groups", 1),
                                   origin=f"{origin}.aux_losses[{j}]")))
    return b.graph(out).replace(frozen=tuple(frozen))


def prepare_blocks(spec: AdapterSpec, model: nn.Module, passes: Sequence[Pass] | None, claimed: set[str]
                   ) -> tuple[list[ResolvedBlock], dict[str, Graph], dict[str, Graph]]:
    """Resolve the blocks and build each one's plain and rewritten graph
    (``passes=None``: :data:`BLOCK_PIPELINE`)."""
    blocks = resolve_blocks(spec, model, claimed)
    pipeline = BLOCK_PIPELINE if passes is None else tuple(passes)
    plain, optimised = {}, {}
    for blk in blocks:
        pool = spec.sites[blk.site_index].adapter
        g = verify(build_block_graph(pool, blk.traced.linears, blk.traced.activation, blk.roles,  # type: ignore
                                     blk.shape, origin=f"sites[{blk.site_index}].adapter"))
        plain[blk.name] = g
        optimised[blk.name] = run_pipeline(g, pipeline)
    return blocks, plain, optimised


def make_block_modules(spec: AdapterSpec, model: nn.Module, blocks: list[ResolvedBlock],
                       graphs: dict[str, Graph], collector: AuxCollector, generator: torch.Generator | None
                       ) -> tuple[dict[str, fx.GraphModule], dict[str, nn.Module]]:
    """``({block name: MoleforgeBlock}, {module name: replacement})``; the second also holds
    the pass-throughs of split FFNs."""
    modules: dict[str, fx.GraphModule] = {}
    swaps: dict[str, nn.Module] = {}
    for blk in blocks:
        init = spec.sites[blk.site_index].init
        down = model.get_submodule(blk.traced.full_name("down"))
        dtype = torch.float64 if down.weight.dtype == torch.float64 else torch.float32
        graph = graphs[blk.name]
        try:
            store = ParamStore(graph.params, up=init.up, std=init.std, generator=generator, dtype=dtype)
            site = lower(graph, store).to(down.weight.device)
            uses_samples = any(isinstance(n, AuxLoss) and n.kind == "localized_balance" for n in graph.nodes)
            made = build_block_module(blk.traced, site, collector, uses_samples=uses_samples, dtype=dtype)
        except MoleforgeError:
            raise
        except Exception as e:  # noqa: BLE001 - name the block in the message
            raise InjectionError(f"could not build the routed FFN block {blk.name!r}: {e}") from e
        modules[blk.name] = made[blk.name]  # type: ignore[assignment]
        swaps.update(made)
    return modules, swaps


def count_block_parameters(spec: AdapterSpec, model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the ``ffn_block`` sites by parameter name (nothing injected)."""
    per: dict[str, int] = {}
    for blk in resolve_blocks(spec, model):
        g = build_block_graph(spec.sites[blk.site_index].adapter, blk.traced.linears,  # type: ignore[arg-type]
                              blk.traced.activation, blk.roles, blk.shape)
        for p in g.params:
            if p.trainable:
                per[p.name] = per.get(p.name, 0) + math.prod(p.shape)
    return per
