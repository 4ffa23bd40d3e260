"""``mf.explain(spec, model)`` and ``handle.explain()``: what the compiler made of each site.

For every group of identical sites (same plain IR, same optimised IR): where they are, the
adapter, its parameters, forward FLOPs per token before and after the passes (next to the
frozen module's; counted by :mod:`.flops`, as ``moleforge inspect`` counts them), the kernel the
lowering runs (with the cost model's estimates for pools), the sibling sites it shares its
input GEMM with, Γ (routing structures per token), and the IR: the plain graph, what each pass
changed, and the final graph.

FFN-block sites (``scope: "ffn_block"``) are described in the same fields, plus the block as
recognised (its linears by their paths in the model, its activation) and the split of its FLOPs
into the adapter's and the frozen block's; their IR goes through the block rewrites
(:data:`~moleforge.compiler.ffn_sites.BLOCK_PIPELINE` by default).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable, Literal, Mapping, Sequence

from torch import nn

from ..compiler.ffn_sites import BLOCK_PIPELINE, ResolvedBlock, prepare_blocks
from ..integrations.block_module import MoleforgeBlock
from ..integrations.siblings import find_siblings
from ..ir import (
    AuxLoss,
    BlockGate,
    Graph,
    GroupedMix,
    Linear,
    OuterGate,
    PoolMix,
    Route,
    SiblingLinear,
    TreeMix,
    TreePathGates,
    TreePropagate,
    print_graph,
)
from ..passes import (
    DEFAULT_PIPELINE,
    ChoosePoolKernels,
    Pass,
    fuse_sibling_sites,
    group_pools,
    pool_cost,
    run_pipeline,
)
from .explain_blocks import block_fields
from .explain_text import SiteRow, block_node, field, gamma_text, parameters_text, router_text, where
from .flops import base_flops_per_token, flops_per_token

__all__ = ["explain", "explain_graphs", "site_rows", "block_rows"]

IRView = Literal["diff", "full", "none"]


def explain(spec: Any, model: nn.Module, *, passes: Sequence[Pass] | None = None, siblings: bool | None = None,
            ir: IRView = "diff") -> str:
    """A readable account of what :func:`moleforge.compile` would build; the model is not changed.

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text or a preset name.
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
    from ..compiler.compile import as_spec, build_site_graphs

    spec = as_spec(spec)
    sites, plain, final = build_site_graphs(spec, model, passes, siblings=False)
    blocks, block_plain, block_final = prepare_blocks(spec, model, passes, {s.name for s in sites})
    pipeline = DEFAULT_PIPELINE if passes is None else tuple(passes)
    note = ""
    if (passes is None) if siblings is None else siblings:
        found = find_siblings(model, list(final))
        final, note = fuse_sibling_sites(final, found.groups), found.note
    rows = site_rows([s.name for s in sites], plain, final) + block_rows(blocks, block_plain, block_final)
    return explain_graphs(spec.name or "adapter", type(model).__name__, rows, pipeline, note, ir)


def site_rows(modules: Iterable[str] | Mapping[str, nn.Module], plain: dict[str, Graph],
              final: dict[str, Graph]) -> list[SiteRow]:
    """One row per adapted module of ``modules`` (names, or ``{name: module}`` as a handle holds
    them: its routed FFN blocks then give the paths of their linears)."""
    found: Mapping[str, nn.Module] = modules if isinstance(modules, Mapping) else {}
    rows = []
    for name in modules:
        module = found.get(name)
        linears = _block_linears(name, module) if isinstance(module, MoleforgeBlock) else None
        rows.append(SiteRow(name, plain[name], final[name], linears))
    return rows


def block_rows(blocks: Sequence[ResolvedBlock], plain: dict[str, Graph], final: dict[str, Graph]) -> list[SiteRow]:
    """One row per resolved FFN block, with the model paths of its linears."""
    return [SiteRow(b.name, plain[b.name], final[b.name], {r: b.traced.full_name(r) for r in b.traced.linears})
            for b in blocks]


def _block_linears(name: str, block: MoleforgeBlock) -> dict[str, str]:
    """Model paths of a routed block's linears. ``block.linears`` holds their paths below the
    traced root: the block itself, or, for an FFN split over two children of a layer (BERT's
    ``intermediate`` and ``output``), the layer, the block being the child holding the down
    projection."""
    parent, _, child = name.rpartition(".")
    root = parent if block.linears["down"].startswith(f"{child}.") else name
    return {role: f"{root}.{target}" if root else target for role, target in block.linears.items()}


def explain_graphs(spec_name: str, model_name: str, sites: list[SiteRow], pipeline: Sequence[Pass],
                   sibling_note: str = "", ir: IRView = "diff") -> str:
    """The explanation of already built graphs (what ``handle.explain()`` uses)."""
    groups: dict[tuple[str, str], list[SiteRow]] = {}
    for s in sites:
        groups.setdefault((_shape_text(s.plain), _shape_text(s.final)), []).append(s)
    trainable = sum(math.prod(p.shape) for s in sites for p in s.final.params if p.trainable)
    block_pipeline = _block_pipeline(pipeline, [s for s in sites if _is_block(s)])
    head = [f"moleforge explain: {spec_name!r} on {model_name}",
            f"  {_count_sites(sites)} in {len(groups)} groups of identical sites; {trainable:,} trainable parameters",
            f"  passes: {_pass_names(pipeline)}"]
    if block_pipeline is not None and block_pipeline != tuple(pipeline):
        head.append(f"  FFN-block passes: {_pass_names(block_pipeline)}")
    if sibling_note:
        head.append(f"  sibling fusion: {sibling_note}")
    texts, shown = [], {}
    for members in groups.values():
        structure = _structure(members[0])
        passes = block_pipeline if _is_block(members[0]) else pipeline
        texts.append(_group(members, passes or (), ir, shown.get(structure)))
        shown.setdefault(structure, where([m.name for m in members]))
    return "\n".join(head) + "\n\n" + "\n\n".join(texts) + "\n"


def _is_block(site: SiteRow) -> bool:
    return block_node(site.plain) is not None


def _count_sites(sites: list[SiteRow]) -> str:
    blocks = sum(_is_block(s) for s in sites)
    if not blocks:
        return f"{len(sites)} adapted linears"
    text = f"{blocks} FFN block" + ("s" if blocks > 1 else "")
    return f"{len(sites) - blocks} adapted linears and {text}" if len(sites) > blocks else text


def _block_pipeline(pipeline: Sequence[Pass], blocks: list[SiteRow]) -> tuple[Pass, ...] | None:
    """The passes the FFN-block sites went through (``None`` without any): ``compile`` and
    ``explain`` run :data:`BLOCK_PIPELINE` on blocks when given no passes (a handle then records
    ``DEFAULT_PIPELINE``), and the given passes otherwise."""
    if not blocks:
        return None
    if tuple(pipeline) == tuple(DEFAULT_PIPELINE) and run_pipeline(blocks[0].plain, BLOCK_PIPELINE) == blocks[0].final:
        return BLOCK_PIPELINE
    return tuple(pipeline)


def _pass_names(pipeline: Sequence[Pass]) -> str:
    return " -> ".join(_pass_name(p) for p in pipeline) or "none"


def _structure(site: SiteRow) -> tuple[str, str]:
    """The IR with every number masked: groups that differ only in widths show their IR once."""
    return tuple(re.sub(r"\d+", "#", _shape_text(g)) for g in (site.plain, site.final))  # type: ignore[return-value]


def _pass_name(p: Pass) -> str:
    name = getattr(p, "__name__", repr(p))
    return f"{name}(tokens={p.tokens})" if isinstance(p, ChoosePoolKernels) else name


def _shape_text(g: Graph) -> str:
    """The printed graph without its label and with sibling groups reduced to their member parts."""
    text = print_graph(g.replace(label=""))
    return re.sub(r"group=\S*?(\{[^}]*\})", r"group=\1", text)


def _group(members: list[SiteRow], pipeline: Sequence[Pass], ir: IRView, same_as: str | None) -> str:
    first = members[0]
    lines = block_fields(members) if _is_block(first) else _linear_fields(members, pipeline)
    if ir == "none":
        return "\n".join(lines)
    if same_as is not None:
        lines.append(f"  IR           as for {same_as} above, with this site's widths")
        return "\n".join(lines)
    lines.append("  IR")
    lines += _ir(first, pipeline, ir)
    return "\n".join(lines)


def _count(members: list[SiteRow]) -> str:
    return f"{len(members)} sites" if len(members) > 1 else "1 site"


def _linear_fields(members: list[SiteRow], pipeline: Sequence[Pass]) -> list[str]:
    first = members[0]
    g, final = first.plain, first.final
    lines = [f"== {where([m.name for m in members])}  ({_count(members)}, d_in {g.d_in} -> d_out {g.d_out})"]
    lines += field("adapter", _describe(g))
    lines += field("parameters", parameters_text(g))
    lines += field("FLOPs/token", _flops(g, final))
    lines += field("base FLOPs", _base_flops(final))
    lines += field("kernel", _kernel(final, pipeline))
    sib = next((n for n in final.nodes if isinstance(n, SiblingLinear)), None)
    if sib is not None:
        members_text = sib.group[sib.group.find("{"):] if "{" in sib.group else sib.group
        lines += field("siblings", f"one input GEMM for {members_text}; this site reads its columns "
                                    f"{sib.start}:{sib.stop}")
    lines += field("Γ", gamma_text(g))
    return lines


def _flops(plain: Graph, final: Graph) -> str:
    """Forward FLOPs per token of the plain and the optimised graph, and of the plain graph with
    its pools computed for the selected experts only."""
    text = f"forward {flops_per_token(plain):,} plain -> {flops_per_token(final):,} optimised"
    sparse = group_pools(plain)
    if sparse is not plain:
        text += f" (the selected experts alone: {flops_per_token(sparse):,})"
    return text


def _base_flops(final: Graph) -> str:
    """Forward FLOPs per token of the frozen linear the site adapts."""
    return f"{base_flops_per_token(final):,} per token in the frozen linear (the adapter runs beside it)"


def _describe(g: Graph) -> str:
    aux = [f"{n.kind} {n.weight:g}" for n in g.nodes if isinstance(n, AuxLoss)]
    tail = f"; aux {', '.join(aux)}" if aux else ""
    tree = next((n for n in g.nodes if isinstance(n, TreeMix)), None)
    if tree is not None:
        route = g.node(tree.routing)
        levels = ", ".join(f"{lv.b.shape[0]}x rank {lv.b.shape[2]} (fanout {gl.fanout})"
                           for lv, gl in zip(tree.levels, route.levels))
        return f"residual tree [{levels}], {tree.activation}, {route.gate} gate{tail}"
    route = next((n for n in g.nodes if isinstance(n, Route)), None)
    if route is None:
        rank = next(n for n in g.nodes if isinstance(n, Linear)).weight.shape[0]  # type: ignore[union-attr]
        return f"LoRA of rank {rank}"
    pool = next((n for n in g.nodes if isinstance(n, (PoolMix, GroupedMix, BlockGate))), None)
    rank = pool.a.shape[1] if isinstance(pool, (PoolMix, GroupedMix)) else getattr(pool, "rank", "?")
    shared = " (one shared A)" if isinstance(pool, PoolMix) and pool.a.shape[0] == 1 else ""
    always = g.param_decls.get("shared_A")
    extra = f", plus an always-on shared LoRA of rank {always.shape[0]}" if always is not None else ""
    return f"pool of {route.experts} experts of rank {rank}{shared}, {router_text(route)}{extra}{tail}"


def _kernel(final: Graph, pipeline: Sequence[Pass]) -> str:
    tokens = next((p.tokens for p in pipeline if isinstance(p, ChoosePoolKernels)), ChoosePoolKernels().tokens)
    kinds = {type(n) for n in final.nodes}
    if PoolMix in kinds:
        return "per-expert loop over all experts (no passes)"
    if TreePathGates in kinds:
        return "linear tree collapsed into per-level block-gated pools (path-aggregated gates)"
    if TreePropagate in kinds:
        return "all residuals of all levels in one GEMM, then per-token tree propagation (gather)"
    if TreeMix in kinds:
        return "tree propagation with per-pool down-projections"
    for n in final.nodes:
        if isinstance(n, (GroupedMix, BlockGate, OuterGate)):
            return _pool_kernel(final, n, tokens)
    return "plain LoRA: two GEMMs"


def _pool_kernel(g: Graph, n, tokens: int) -> str:
    route = g.node(n.routing)
    E = route.experts
    if isinstance(n, OuterGate):
        return f"shared down-projection once, outer-product gate, one up-projection of rank {g.width(n.id)}"
    rank = n.a.shape[1] if isinstance(n, GroupedMix) else n.rank
    k = route.gate.k
    form = (f"grouped GEMMs over each token's top-{k} experts ({k * rank} of {E * rank} ranks)"
            if isinstance(n, GroupedMix) else f"dense block-gated LoRA of rank {E * rank}")
    if k is None:
        return form
    cost = pool_cost(E, rank, g.d_in, g.d_out, k, tokens)
    return f"{form}; cost model at {tokens:,} tokens: dense {cost.dense / 1e6:.0f}M vs grouped " \
           f"{cost.grouped / 1e6:.0f}M multiply-add equivalents"


def _node_lines(g: Graph) -> list[str]:
    return [ln for ln in print_graph(g).splitlines()[1:] if not ln.startswith("  param ")]


def _ir(site: SiteRow, pipeline: Sequence[Pass], ir: IRView) -> list[str]:
    trace: list = []
    run_pipeline(site.plain, pipeline, trace)
    if site.final != (trace[-1][1] if trace else site.plain):
        trace.append(("fuse_sibling_sites", site.final))
    out = ["    plain", *("    " + ln for ln in _node_lines(site.plain))]
    prev = site.plain
    for name, g in trace:
        if g == prev:
            out.append(f"    after {name}: unchanged")
            continue
        out.append(f"    after {name}")
        if ir == "full":
            out += ["    " + ln for ln in _node_lines(g)]
        else:
            diff = difflib.unified_diff(_node_lines(prev), _node_lines(g), lineterm="", n=0)
            out += [f"    {ln[0]} {ln[1:].strip()}" for ln in diff if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
        prev = g
    if ir == "diff" and trace:
        out += ["    final", *("    " + ln for ln in _node_lines(site.final))]
    return out
