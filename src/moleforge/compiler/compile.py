"""``compile``: spec + model -> plan -> lowered sites swapped into the model -> handle; and the
structural facts of a spec."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..backends.runtime.policy import KernelPolicy
from ..backends.runtime.siblings import SiblingGroup
from ..backends.torch_fx.init import ParamStore
from ..backends.torch_fx.lower import lower
from ..errors import InjectionError, MoleforgeError
from ..integrations.block_module import build_block_module
from ..integrations.handle import AdapterHandle
from ..integrations.inject import AdaptedLinear, AuxCollector, swap_modules
from ..integrations.sites import ResolvedSite
from ..integrations.xlora import XLoRAHandle, xlora_router
from ..ir import AuxLoss, Graph, SiblingLinear, TaskContrastive, TaskEmbed, TaskScale, TaskScores
from ..passes import Pass
from ..report.explain import IRView, explain_plan
from ..report.structure import structural_flexibility
from ..specs import AdapterSpec
from .planner import Plan, PlannedSite, as_spec, plan

__all__ = ["compile", "explain", "as_spec", "build_site_graphs", "count_parameters", "structural_flexibility"]


def build_site_graphs(spec: AdapterSpec, model: nn.Module, passes: Sequence[Pass] | None = None,
                      siblings: bool | None = None) -> tuple[list[ResolvedSite], dict[str, Graph], dict[str, Graph]]:
    """The linear sites of :func:`plan` with each one's plain and optimised graph."""
    p = plan(spec, model, passes, siblings=siblings)
    linear = [s for s in p.sites if s.scope == "linear"]
    return ([s.resolved for s in linear], {s.name: s.plain for s in linear},  # type: ignore[misc]
            {s.name: s.final for s in linear})


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def compile(spec: Any, model: nn.Module, *, passes: Sequence[Pass] | None = None,  # noqa: A001
            siblings: bool | None = None, policy: KernelPolicy | None = None,
            read_sources: bool = True) -> AdapterHandle:
    """Compile ``spec`` into ``model`` in place and return the handle: :func:`plan`, then lower
    every site and swap it in.

    The model's own parameters are frozen; the adapter's are trainable. On any error
    the model is left exactly as it was. Before allocating anything, an adapter too large for
    the model is refused (see :mod:`moleforge.compiler.sizes`: more than
    ``max(4 × the model's parameters, 2**28)`` numbers at one site, ``MOLEFORGE_MAX_SITE_PARAMS``
    to change that, or more memory than the model's device has in all).

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text, a preset name, or a :class:`Plan` made
            for this model.
        model: a HuggingFace model (or any module with ``nn.Linear`` / ``Conv1D`` children).
        passes: optimisation passes (default: ``moleforge.passes.DEFAULT_PIPELINE``; ``()`` for none).
        siblings: give sites that read the same tensor (q/k/v, gate/up) one input GEMM
            (default: with the default pipeline).
        policy: the kernels the sites run (default: ``KernelPolicy.from_env()``, read once).
        read_sources: load the experts of pools with ``experts_from`` from their PEFT LoRA folders
            (``False``: leave them initialised, for a caller that loads saved tensors).

    Example:
        >>> handle = mf.compile(mf.presets.load("smore"), model)  # doctest: +SKIP
    """
    p = spec if isinstance(spec, Plan) else plan(spec, model, passes, siblings=siblings, policy=policy,
                                                 read_sources=read_sources)
    groups = {n.group: SiblingGroup(n.group) for s in p.sites for n in s.final.nodes if isinstance(n, SiblingLinear)}
    collector = AuxCollector()
    seeds = {s.init.seed for s in p.spec.sites} - {None}
    gen = torch.Generator().manual_seed(min(seeds)) if seeds else None
    modules: dict[str, nn.Module] = {}
    swaps: dict[str, nn.Module] = {}
    policy = p.policy
    for site in p.sites:
        made = _lower_site(p.spec, site, model, groups, collector, gen, policy)
        modules[site.name] = made[site.name]
        policy = made[site.name].site.kernel_policy  # with the CPU kernel's build recorded, once
        swaps.update(made)
    requires_grad = {n: q.requires_grad for n, q in model.named_parameters()}
    originals = swap_modules(model, swaps)
    for q in model.parameters():
        q.requires_grad_(False)
    for mod in modules.values():
        for q in mod.site.parameters():
            q.requires_grad_(True)
    if policy != p.policy:
        p = dataclasses.replace(p, policy=policy)
    kind = XLoRAHandle if xlora_router(p.spec) is not None else AdapterHandle
    handle = kind(model, p, modules, originals, collector, requires_grad)
    handle._recompile = compile  # what handle.add_task() (MoRA-CL) compiles the grown spec with
    if p.source_tensors:
        handle.load_state_dict(p.source_tensors)
    return handle


def explain(spec: Any, model: nn.Module | None = None, *, passes: Sequence[Pass] | None = None,
            siblings: bool | None = None, ir: IRView = "diff") -> str:
    """A readable account of what :func:`compile` would build; the model is not changed.

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text or a preset name (planned on ``model``),
            or a :class:`Plan` (then ``model`` and the options are not needed).
        passes: the pipeline to explain (default: ``DEFAULT_PIPELINE``; ``()`` for none).
        siblings: explain with sibling fusion (default: with the default pipeline).
        ir: ``"diff"`` the plain IR, each pass's changes and the final IR; ``"full"`` the whole
            IR after every pass; ``"none"`` no IR.

    Sites of scope ``ffn_block`` are shown after the linear sites, one group per kind of block:
    the linears and activation recognised, experts, router and rank, the routed-block kernel,
    parameters, FLOPs (the whole routed block, the adapter's and the frozen GEMMs') and Γ.

    Example:
        >>> print(mf.explain("molora", model))  # doctest: +SKIP
    """
    if not isinstance(spec, Plan):
        if model is None:
            raise TypeError("explain(spec, model): a spec is explained on a model; pass the model or a Plan")
        spec = plan(spec, model, passes, siblings=siblings)
    return explain_plan(spec, ir)


def _lower_site(spec: AdapterSpec, site: PlannedSite, model: nn.Module, groups: dict[str, SiblingGroup],
                collector: AuxCollector, gen: torch.Generator | None, policy: KernelPolicy) -> dict[str, nn.Module]:
    """``{module name: replacement}`` for one site; a block split over two modules (BERT) gives two."""
    init = spec.sites[site.site_index].init
    graph = site.final
    block = site.block
    base = model.get_submodule(block.traced.full_name("down") if block is not None else site.name)
    what = f"the routed FFN block {site.name!r}" if block is not None else f"the adapter for module {site.name!r}"
    uses_samples = any((isinstance(n, AuxLoss) and n.kind in ("localized_balance", "task_routing"))
                       or isinstance(n, (TaskScores, TaskEmbed, TaskScale, TaskContrastive)) for n in graph.nodes)
    dtype = _adapter_dtype(base.weight)
    try:
        store = ParamStore(graph.params, up=init.up, std=init.std, generator=gen, dtype=dtype)
        gm = lower(graph, store, groups, policy, device=base.weight.device, plain=site.plain).to(base.weight.device)
        if block is not None:
            return build_block_module(block.traced, gm, collector, uses_samples=uses_samples, dtype=dtype)
        adapted = AdaptedLinear(base, gm, collector, uses_samples=uses_samples, site_name=site.name,
                                reads_weight=bool(graph.frozen))
        return {site.name: adapted.train(base.training)}
    except MoleforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - name the module in the message
        raise InjectionError(f"could not build {what}: {e}") from e


# ---- structural facts -------------------------------------------------------------------

def count_parameters(spec: Any, model: nn.Module, *, breakdown: bool = False) -> int | dict[str, int]:
    """Trainable adapter parameters ``spec`` would add to ``model`` (nothing is injected).

    With ``breakdown=True``: ``{parameter name: count}`` summed over sites (e.g. ``A``, ``B``,
    ``router_w``; for trees also ``W1``, ``proj_w``, biases, router MLPs).
    """
    per: dict[str, int] = {}
    for site in plan(spec, model, passes=(), siblings=False, check_sizes=False).sites:
        for p in site.plain.params:
            if p.trainable:
                per[p.name] = per.get(p.name, 0) + math.prod(p.shape)
    return per if breakdown else sum(per.values())
