"""Find where a spec's sites go on a model: roles and module patterns resolved to the
model's linears, layer selection, per-layer overrides."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import InjectionError
from ..specs import AdapterSpec, Site
from .block_module import MoleforgeBlock
from .inject import AdaptedLinear, linear_dims

__all__ = ["SiteShape", "ResolvedSite", "resolve_sites", "check_no_adapter", "ROLE_PATTERNS", "layer_of",
           "num_layers"]

# How each role is spelled in the module trees of the supported families (Llama, Mistral,
# Qwen2, Gemma, Phi: q_proj...; GPT-2: c_attn/c_proj/c_fc; BERT: query/key/value/dense).
# Matched against the end of the full module name, after a dot.
ROLE_PATTERNS: dict[str, tuple[str, ...]] = {
    "q": (r"(self_attn|attention|attn)\.q_proj", r"attention\.self\.query", r"attn\.c_attn"),
    "k": (r"(self_attn|attention|attn)\.k_proj", r"attention\.self\.key", r"attn\.c_attn"),
    "v": (r"(self_attn|attention|attn)\.v_proj", r"attention\.self\.value", r"attn\.c_attn"),
    "o": (r"(self_attn|attention|attn)\.o_proj", r"attention\.output\.dense", r"attn\.c_proj",
          r"self_attn\.dense"),
    "gate": (r"mlp\.gate_proj",),
    "up": (r"mlp\.up_proj", r"intermediate\.dense", r"mlp\.c_fc", r"mlp\.fc1"),
    "down": (r"mlp\.down_proj", r"(layer|layers)\.\d+\.output\.dense", r"mlp\.c_proj", r"mlp\.fc2"),
}

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class SiteShape:
    """What the front end needs to know of a resolved site: its label, widths and per-layer
    overrides."""

    label: str
    d_in: int
    d_out: int
    experts: int | None = None
    """Per-layer override of the pool size (MoLA)."""
    rank: int | None = None


@dataclass(frozen=True)
class ResolvedSite:
    name: str
    site_index: int
    layer: int | None
    shape: SiteShape
    roles: tuple[str, ...]


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    found = [layer_of(n) for n, _ in model.named_modules()]
    return max([f for f in found if f is not None], default=-1) + 1


def _roles_of(name: str, roles: list[str]) -> tuple[str, ...]:
    return tuple(r for r in roles if any(re.search(rf"(^|\.){p}$", name) for p in ROLE_PATTERNS[r]))


def _matches(site: Site, name: str) -> tuple[str, ...] | None:
    t = site.target
    roles = _roles_of(name, list(t.roles))
    if roles:
        return roles
    if any(re.fullmatch(p, name) for p in t.modules):
        return ("module",)
    return None


def _override(site: Site, layer: int | None, n_layers: int) -> tuple[int | None, int | None]:
    experts = rank = None
    if layer is None:
        return experts, rank
    for ov in site.target.overrides:
        if ov.covers(layer, n_layers):
            experts = ov.experts if ov.experts is not None else experts
            rank = ov.rank if ov.rank is not None else rank
    return experts, rank


def check_no_adapter(model: nn.Module) -> None:
    """Raise :class:`InjectionError` when ``model`` already holds a moleforge adapter (an adapted
    linear or a routed FFN block): one model takes one compiled spec at a time."""
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLinear, MoleforgeBlock)):
            what = "carries a moleforge adapter" if isinstance(module, AdaptedLinear) else "is a routed FFN block"
            raise InjectionError(f"this {type(model).__name__} already holds a moleforge adapter (module {name!r} "
                                 f"{what}); call remove() first on the handle that mf.compile or mf.load returned, "
                                 "or compile into a fresh copy of the model")


def resolve_sites(spec: AdapterSpec, model: nn.Module) -> list[ResolvedSite]:
    """Every (module, site) pair the spec asks for, in model order.

    Raises:
        InjectionError: a site matches nothing, a module is claimed by two sites, or the
            model already holds a moleforge adapter.
    """
    check_no_adapter(model)
    n_layers = num_layers(model)
    claimed: dict[str, int] = {}
    out: list[ResolvedSite] = []
    seen_roles: dict[int, set[str]] = {i: set() for i in range(len(spec.sites))}
    for name, module in model.named_modules():
        dims = linear_dims(module)
        if dims is None:
            continue
        for i, site in enumerate(spec.sites):
            if site.scope != "linear":  # ffn_block sites are resolved by ffn_blocks
                continue
            roles = _matches(site, name)
            if roles is None:
                continue
            layer = layer_of(name)
            if site.target.layers is not None and layer not in site.target.layers:
                continue
            if name in claimed:
                raise InjectionError(f"module {name!r} is targeted by sites[{claimed[name]}] and sites[{i}]; "
                                     "a linear takes one adapter: narrow the targets (roles, modules or layers)")
            claimed[name] = i
            seen_roles[i].update(roles)
            experts, rank = _override(site, layer, n_layers)
            out.append(ResolvedSite(name=name, site_index=i, layer=layer, roles=roles,
                                    shape=SiteShape(label=name, d_in=dims[0], d_out=dims[1],
                                                    experts=experts, rank=rank)))
    _check_coverage(spec, model, seen_roles)
    return out


def _check_coverage(spec: AdapterSpec, model: nn.Module, seen: dict[int, set[str]]) -> None:
    arch = type(model).__name__
    for i, site in enumerate(spec.sites):
        if site.scope != "linear":
            continue
        if not seen[i]:
            what = ", ".join(list(site.target.roles) + [repr(m) for m in site.target.modules])
            raise InjectionError(
                f"sites[{i}] ({what}) matches no nn.Linear or Conv1D of {arch}; check the roles, the module "
                f"patterns (full-name regular expressions) and the layers")
        missing = [r for r in site.target.roles if r not in seen[i]]
        if missing:
            warnings.warn(f"sites[{i}]: {arch} has no linear for role(s) {', '.join(missing)}; "
                          "those are left without adapters", stacklevel=5)
