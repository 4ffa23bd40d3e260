"""``compile``: spec + model -> injected adapter handle; and the structural facts of a spec."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..backends.torch_fx.init import ParamStore
from ..backends.torch_fx.inject import AdaptedLinear, AuxCollector, swap_modules
from ..backends.torch_fx.lower import lower
from ..backends.torch_fx.siblings import SiblingGroup
from ..errors import InjectionError, MoleforgeError, SpecError
from ..ir import AuxLoss, Graph, SiblingLinear, verify
from ..passes import DEFAULT_PIPELINE, Pass, fuse_sibling_sites, run_pipeline
from ..specs import AdapterSpec, ExpertPool, LoRA, RankPartition, ResidualTree
from .build import build_graph
from .ffn_sites import count_block_parameters, make_block_modules, prepare_blocks
from .handle import AdapterHandle
from .siblings import find_siblings
from .sites import ResolvedSite, resolve_sites
from .sizes import SizeCheck

__all__ = ["compile", "as_spec", "build_site_graphs", "count_parameters", "structural_flexibility"]


def as_spec(spec: Any) -> AdapterSpec:
    """Accept an ``AdapterSpec``, a dict, a JSON string or a preset name."""
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, dict):
        return AdapterSpec.model_validate(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            return AdapterSpec.model_validate_json(text)
        from ..specs import presets
        return presets.load(text)
    raise SpecError(f"expected an AdapterSpec, a dict, JSON text or a preset name, got {type(spec).__name__}")


def build_site_graphs(spec: AdapterSpec, model: nn.Module, passes: Sequence[Pass] | None = None,
                      siblings: bool | None = None) -> tuple[list[ResolvedSite], dict[str, Graph], dict[str, Graph]]:
    """Resolve sites and build each one's plain and optimised graph; with ``siblings`` (default:
    when the default pipeline runs) sites that read the same tensor share their input GEMM.

    Raises:
        InjectionError: a site's adapter is too large for the model (:class:`SizeCheck`), found
            before the passes run.
    """
    sites = resolve_sites(spec, model)
    plain, optimised = {}, {}
    pipeline = DEFAULT_PIPELINE if passes is None else tuple(passes)
    size = SizeCheck(model)
    for s in sites:
        g = build_graph(spec.sites[s.site_index].adapter, s.shape, origin=f"sites[{s.site_index}].adapter")
        size.site(s.name, s.site_index, g)
        plain[s.name] = verify(g)
    for s in sites:
        optimised[s.name] = run_pipeline(plain[s.name], pipeline)
    if (passes is None) if siblings is None else siblings:
        optimised = fuse_sibling_sites(optimised, find_siblings(model, list(optimised)).groups)
    return sites, plain, optimised


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    w = base.weight
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def compile(spec: Any, model: nn.Module, *, passes: Sequence[Pass] | None = None,  # noqa: A001
            siblings: bool | None = None) -> AdapterHandle:
    """Compile ``spec`` into ``model`` in place and return the handle.

    The model's own parameters are frozen; the adapter's are trainable. On any error
    the model is left exactly as it was. Before allocating anything, an adapter too large for
    the model is refused (see :mod:`moleforge.compiler.sizes`: more than
    ``max(4 × the model's parameters, 2**28)`` numbers at one site, ``MOLEFORGE_MAX_SITE_PARAMS``
    to change that, or more memory than the model's device has in all).

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text or a preset name.
        model: a HuggingFace model (or any module with ``nn.Linear`` / ``Conv1D`` children).
        passes: optimisation passes (default: ``moleforge.passes.DEFAULT_PIPELINE``; ``()`` for none).
        siblings: give sites that read the same tensor (q/k/v, gate/up) one input GEMM
            (default: with the default pipeline).

    Example:
        >>> handle = mf.compile(mf.presets.load("smore"), model)  # doctest: +SKIP
    """
    spec = as_spec(spec)
    sites, plain, graphs = build_site_graphs(spec, model, passes, siblings)
    groups = {n.group: SiblingGroup(n.group) for g in graphs.values() for n in g.nodes if isinstance(n, SiblingLinear)}
    blocks, block_plain, block_graphs = prepare_blocks(spec, model, passes, {s.name for s in sites})
    SizeCheck(model).total({**plain, **block_plain}, {**{s.name: s.site_index for s in sites},
                                                     **{b.name: b.site_index for b in blocks}})
    collector = AuxCollector()
    gen = None
    seeds = {s.init.seed for s in spec.sites} - {None}
    if seeds:
        gen = torch.Generator().manual_seed(min(seeds))
    replacements: dict[str, AdaptedLinear] = {}
    site_of: dict[str, int] = {}
    for s in sites:
        base = model.get_submodule(s.name)
        init = spec.sites[s.site_index].init
        try:
            store = ParamStore(graphs[s.name].params, up=init.up, std=init.std, generator=gen,
                               dtype=_adapter_dtype(base))
            gm = lower(graphs[s.name], store, groups).to(base.weight.device)
        except MoleforgeError:
            raise
        except Exception as e:  # noqa: BLE001 - name the module in the message
            raise InjectionError(f"could not build the adapter for module {s.name!r}: {e}") from e
        uses_samples = any(isinstance(n, AuxLoss) and n.kind == "localized_balance" for n in graphs[s.name].nodes)
        adapted = AdaptedLinear(base, gm, collector, uses_samples=uses_samples).train(base.training)
        adapted.site_name = s.name
        replacements[s.name] = adapted
        site_of[s.name] = s.site_index
    # ffn_block sites: routed GraphModules replacing whole MLP blocks (see ffn_sites)
    block_modules, block_swaps = make_block_modules(spec, model, blocks, block_graphs, collector, gen)
    site_of.update({b.name: b.site_index for b in blocks})
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    originals = swap_modules(model, {**replacements, **block_swaps})
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {**replacements, **block_modules}
    for mod in modules.values():
        for p in mod.site.parameters():
            p.requires_grad_(True)
    pipeline = DEFAULT_PIPELINE if passes is None else tuple(passes)
    return AdapterHandle(model, spec, modules, {**graphs, **block_graphs},  # type: ignore[arg-type]
                         originals, collector, requires_grad, site_of, {**plain, **block_plain}, pipeline)


# ---- structural facts -------------------------------------------------------------------

def count_parameters(spec: Any, model: nn.Module, *, breakdown: bool = False) -> int | dict[str, int]:
    """Trainable adapter parameters ``spec`` would add to ``model`` (nothing is injected).

    With ``breakdown=True``: ``{parameter name: count}`` summed over sites (e.g. ``A``, ``B``,
    ``router_w``; for trees also ``W1``, ``proj_w``, biases, router MLPs).
    """
    spec = as_spec(spec)
    sites = resolve_sites(spec, model)
    per: dict[str, int] = {}
    for s in sites:
        g = build_graph(spec.sites[s.site_index].adapter, s.shape)
        for p in g.params:
            if p.trainable:
                per[p.name] = per.get(p.name, 0) + math.prod(p.shape)
    for name, n in count_block_parameters(spec, model).items():
        per[name] = per.get(name, 0) + n
    return per if breakdown else sum(per.values())


def _gamma(adapter, experts: int | None = None) -> int:
    match adapter:
        case LoRA():
            return 1
        case RankPartition():
            return _gamma(adapter.as_pool())
        case ExpertPool():
            E = experts or adapter.experts
            k = getattr(adapter.router, "k", None)
            return 1 if k is None else math.comb(E, k)
        case ResidualTree():
            fan = adapter.fanouts()
            gamma, F = 1, 1
            for l in reversed(range(len(adapter.levels))):
                gamma *= math.comb(adapter.levels[l].experts, fan[l]) ** F
                F *= fan[l]
            return gamma
    raise TypeError(adapter)


def structural_flexibility(spec: Any) -> int | dict[str, int]:
    """Γ (METHODS.md §1.7): distinct routing structures per token at one adapted linear.

    ``Π_l C(s_l, f_l)^{F_{l+1}}`` for an S'MoRE tree (216 for the ``smore`` preset),
    ``C(E, k)`` for a top-k pool, 1 for dense routing or plain LoRA. A spec whose sites
    (or per-layer overrides) differ gives ``{"sites[i]" or "sites[i].layers[...]": Γ}``.
    """
    spec = as_spec(spec)
    values: dict[str, int] = {}
    for i, site in enumerate(spec.sites):
        values[f"sites[{i}]"] = _gamma(site.adapter)
        for j, ov in enumerate(site.target.overrides):
            if ov.experts is not None:
                values[f"sites[{i}].overrides[{j}]"] = _gamma(site.adapter, ov.experts)
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values
