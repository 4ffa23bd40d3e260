"""``plan``: the front end's one step, spec + model -> :class:`Plan`.

A plan holds every site the spec asks for on the model, linear sites and FFN blocks alike (a
block is a site whose frozen projections are inputs of its graph), each with its plain graph,
its graph after the pipeline and the trace of what each pass made of it; the sibling groups
found on the model; and the pipeline. Nothing in the model is changed. ``compile`` lowers and
injects a plan; ``explain`` reads one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

from torch import nn

from ..backends.runtime.policy import KernelPolicy
from ..backends.torch_fx.lower_routed import fuses_router
from ..integrations.ffn_blocks import ResolvedBlock, resolve_blocks
from ..integrations.siblings import find_siblings
from ..integrations.sites import ResolvedSite, resolve_sites
from ..integrations.xlora import model_hidden_size
from ..ir import Graph, verify
from ..passes import DEFAULT_PIPELINE, ChoosePoolKernels, Pass, PipelineTrace, fuse_sibling_sites, run_pipeline
from ..specs import AdapterSpec, as_spec
from .build import build_block_graph, build_graph
from .sizes import SizeCheck
from .sources import resolve_sources

__all__ = ["Plan", "PlannedSite", "plan", "as_spec"]

SIBLING_PASS = "fuse_sibling_sites"
"""The trace name of the cross-site step that gives sibling sites one input GEMM."""


@dataclass(frozen=True)
class PlannedSite:
    """One adapted module: a linear (``scope="linear"``) or a whole FFN block (``"ffn_block"``)."""

    name: str
    """The module the adapter replaces (the linear, or the FFN block)."""
    site_index: int
    """Its entry in ``spec.sites``."""
    scope: Literal["linear", "ffn_block"]
    plain: Graph
    """The graph as the front end built it."""
    final: Graph
    """The graph after the pipeline and, for siblings, the sibling fusion: what is lowered."""
    trace: tuple[tuple[str, Graph], ...]
    """``(step, graph after it)`` for every pass that ran, in order, then the sibling fusion if it
    changed the graph."""
    resolved: ResolvedSite | ResolvedBlock = field(repr=False, compare=False)
    """Where the site sits on the model (for a block: the traced block and its linears)."""

    @property
    def block(self) -> ResolvedBlock | None:
        return self.resolved if isinstance(self.resolved, ResolvedBlock) else None


@dataclass(frozen=True)
class Plan:
    """What ``compile`` will build, decided before the model is touched."""

    spec: AdapterSpec
    model_name: str
    """The model's class name."""
    sites: tuple[PlannedSite, ...]
    """Linear sites in model order, then FFN blocks."""
    pipeline: tuple[Pass, ...]
    sibling_groups: tuple[tuple[str, ...], ...] = ()
    """Module names of sites that read the same tensor and share one input GEMM."""
    sibling_note: str = ""
    """Why sibling fusion found nothing to fuse or was not looked for, when that is so."""
    policy: KernelPolicy = field(default_factory=KernelPolicy.from_env)
    """Which kernels the lowered sites run (Triton, the CPU kernel or torch ops, per device)."""
    hidden_size: int | None = None
    """The model's hidden size (``config.hidden_size``), when it has one (X-LoRA's classifier reads it)."""
    source_tensors: dict = field(default_factory=dict, repr=False, compare=False)
    """``{"<module>.A"/"<module>.B": tensor}`` read from the PEFT LoRA folders of pools with
    ``experts_from``; ``compile`` loads them into the sites."""

    def site(self, name: str) -> PlannedSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def graphs(self) -> dict[str, Graph]:
        """The lowered graph of every site, by module name."""
        return {s.name: s.final for s in self.sites}

    @property
    def plain_graphs(self) -> dict[str, Graph]:
        return {s.name: s.plain for s in self.sites}

    @property
    def site_of(self) -> dict[str, int]:
        """The spec site of every adapted module."""
        return {s.name: s.site_index for s in self.sites}


def plan(spec: Any, model: nn.Module, passes: Sequence[Pass] | None = None, *,
         siblings: bool | None = None, policy: KernelPolicy | None = None, check_sizes: bool = True,
         read_sources: bool = True) -> Plan:
    """Resolve every site of ``spec`` on ``model``, build its graph and run the pipeline on it.

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text or a preset name.
        passes: the pipeline (default: ``moleforge.passes.DEFAULT_PIPELINE``; ``()`` for none). One
            pipeline serves every site: passes leave graphs they do not apply to unchanged.
        siblings: give linear sites that read the same tensor (q/k/v, gate/up) one input GEMM
            (default: with the default pipeline). The model is run once on its dummy inputs to
            find them.
        policy: the kernels to run (default: ``KernelPolicy.from_env()``, which reads
            ``MOLEFORGE_TRITON`` and ``MOLEFORGE_CPU_KERNELS`` now, once). Where it plans the
            compiled CPU kernel for the model's device and dtype, the pipeline's pool-form choice is
            priced for that kernel (``ChoosePoolKernels(kernel="cpu")``) and the routers it computes
            stay out of sibling groups.
        check_sizes: refuse adapters too large for the model (``False`` to plan one anyway, e.g.
            to count its parameters).
        read_sources: read the PEFT LoRA folders of pools with ``experts_from`` (their ranks,
            alphas and tensors); ``False`` when the spec already records them and the tensors
            come from elsewhere (``mf.load``).

    Raises:
        SpecError, InjectionError: the spec does not fit the model (the message names the site), or
            a site's adapter is too large for it (:class:`~moleforge.compiler.sizes.SizeCheck`),
            found before the passes run and before anything is allocated.
    """
    spec, sources = resolve_sources(as_spec(spec), model) if read_sources else (as_spec(spec), {})
    policy = KernelPolicy.from_env() if policy is None else policy
    cpu_pools = _plans_cpu_pools(policy, model)
    pipeline = DEFAULT_PIPELINE if passes is None else tuple(passes)
    if cpu_pools:
        pipeline = _priced_for_cpu(pipeline)
    linear = resolve_sites(spec, model)
    blocks = resolve_blocks(spec, model, {s.name for s in linear})
    size = SizeCheck(model) if check_sizes else None
    plain = {w.name: _plain(spec, w, size) for w in (*linear, *blocks)}
    if size is not None:
        size.total(plain, {w.name: w.site_index for w in (*linear, *blocks)})
    planned = [_planned(w, plain[w.name], pipeline) for w in (*linear, *blocks)]
    groups: tuple[tuple[str, ...], ...] = ()
    note = ""
    if (passes is None) if siblings is None else siblings:
        found = find_siblings(model, [s.name for s in linear])
        groups, note = tuple(tuple(g) for g in found.groups), found.note
        if cpu_pools:  # the CPU kernel computes the routers of routed pools itself
            groups, note = _without_kernel_routers(groups, planned, note)
        planned = _fuse_siblings(planned, groups)
    return Plan(spec=spec, model_name=type(model).__name__, sites=tuple(planned), pipeline=pipeline,
                sibling_groups=groups, sibling_note=note,
                policy=policy, source_tensors=sources,
                hidden_size=model_hidden_size(model))


def _plans_cpu_pools(policy: KernelPolicy, model: nn.Module) -> bool:
    """Whether the grouped pools of ``model`` will run the compiled CPU kernel (its device and dtype)."""
    p = next(model.parameters(), None)
    return p is not None and policy.plans_cpu_pools(p.device, p.dtype)


def _priced_for_cpu(pipeline: tuple[Pass, ...]) -> tuple[Pass, ...]:
    """``pipeline`` with its pool-form choice priced for the CPU kernel running the grouped form."""
    return tuple(replace(s, kernel="cpu") if isinstance(s, ChoosePoolKernels) else s for s in pipeline)


def _without_kernel_routers(groups: tuple[tuple[str, ...], ...], planned: list[PlannedSite],
                            note: str) -> tuple[tuple[tuple[str, ...], ...], str]:
    """The sibling groups without the sites whose router the pool's CPU kernel computes
    (``lower_routed.fuses_router``); a group left with one member is dropped."""
    finals = {s.name: s.final for s in planned}
    kept = tuple(g for g in (tuple(m for m in grp if not fuses_router(finals[m])) for grp in groups) if len(g) > 1)
    if groups and not kept:
        note = "the routed pools' CPU kernel computes each site's router in its own pass over the input"
    return kept, note


def _plain(spec: AdapterSpec, where: ResolvedSite | ResolvedBlock, size: SizeCheck | None) -> Graph:
    """The site's graph as the front end builds it, refused before verifying when it is too large."""
    origin = f"sites[{where.site_index}].adapter"
    adapter = spec.sites[where.site_index].adapter
    if isinstance(where, ResolvedBlock):
        graph = build_block_graph(adapter, where.traced.linears, where.traced.activation,  # type: ignore[arg-type]
                                  where.roles, where.shape, origin=origin)
    else:
        graph = build_graph(adapter, where.shape, origin=origin)
    if size is not None:
        size.site(where.name, where.site_index, graph)
    return verify(graph)


def _planned(where: ResolvedSite | ResolvedBlock, plain: Graph, pipeline: Sequence[Pass]) -> PlannedSite:
    trace: PipelineTrace = []
    final = run_pipeline(plain, pipeline, trace)
    scope = "ffn_block" if isinstance(where, ResolvedBlock) else "linear"
    return PlannedSite(name=where.name, site_index=where.site_index, scope=scope, plain=plain, final=final,
                       trace=tuple(trace), resolved=where)


def _fuse_siblings(sites: list[PlannedSite], groups: tuple[tuple[str, ...], ...]) -> list[PlannedSite]:
    linear = {s.name: s.final for s in sites if s.scope == "linear"}
    fused = fuse_sibling_sites(linear, [list(g) for g in groups])
    out = []
    for s in sites:
        g = fused.get(s.name, s.final)
        if g is not s.final and g != s.final:
            s = PlannedSite(name=s.name, site_index=s.site_index, scope=s.scope, plain=s.plain, final=g,
                            trace=(*s.trace, (SIBLING_PASS, g)), resolved=s.resolved)
        out.append(s)
    return out
