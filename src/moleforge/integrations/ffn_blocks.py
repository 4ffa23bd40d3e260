"""FFN-block sites (``scope: "ffn_block"``): find the MLP blocks a site targets and trace each
with ``torch.fx`` (the front end then builds its IR, :class:`~moleforge.ir.ExpertFFN` over the
block's frozen weights, and the compiler the routed module that replaces it).

A block is the smallest module holding one layer's FFN linears (``model.layers.i.mlp``,
``transformer.h.i.mlp``); BERT's FFN, split over ``intermediate`` and ``output``, is traced
through the layer method that calls both. The site's targets say which of the block's
linears carry expert LoRAs; the block's structure (gate/up/down, activation) comes from
its graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import InjectionError
from ..specs import AdapterSpec, ExpertPool, PerExpert, Site
from .ffn_trace import TracedBlock, trace_block
from .inject import linear_dims
from .sites import ROLE_PATTERNS, SiteShape, check_no_adapter, layer_of, num_layers

__all__ = ["ResolvedBlock", "resolve_blocks"]

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


def _attention_roles(name: str) -> list[str]:
    """The attention roles (q, k, v, o) whose module pattern ``name`` matches."""
    return [r for r in ("q", "k", "v", "o") if any(re.search(rf"(^|\.){p}$", name) for p in ROLE_PATTERNS[r])]


def _check_no_attention(i: int, targets: list[str]) -> None:
    """``ffn_block`` sites route FFN blocks; module patterns must not reach attention projections."""
    attention = {t: _attention_roles(t) for t in targets if _attention_roles(t)}
    if attention:
        found = ", ".join(f"{t!r} (role {'/'.join(r)})" for t, r in attention.items())
        raise InjectionError(f"sites[{i}] (scope 'ffn_block') targets attention projections: {found}; an "
                             "ffn_block site routes FFN blocks (their gate, up and down linears): narrow "
                             "target.modules, and adapt attention linears with a second site of scope 'linear'")


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
    check_no_adapter(model)
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
            _check_no_attention(i, targets)
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
