"""``mf.explain(spec, model)`` and ``handle.explain()``: what the compiler made of each site.

For every group of identical sites (same plain IR, same optimised IR): where they are, the
adapter, its parameters, forward FLOPs per token before and after the passes (next to the
frozen module's; counted by :mod:`.flops`, as ``moleforge inspect`` counts them), the kernel the
lowering runs (with the cost model's estimates for pools), the sibling sites it shares its
input GEMM with, Γ (routing structures per token), and the IR: the plain graph, what each pass
changed, and the final graph.
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from torch import nn

from ..ir import (
    AuxLoss,
    BlockGate,
    DenseSoftmax,
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
    TreeRoute,
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
from .flops import base_flops_per_token, flops_per_token
from .siblings import find_siblings

__all__ = ["explain", "explain_graphs", "site_rows"]

IRView = Literal["diff", "full", "none"]


@dataclass(frozen=True)
class _Site:
    name: str
    plain: Graph
    final: Graph


def explain(spec: Any, model: nn.Module, *, passes: Sequence[Pass] | None = None, siblings: bool | None = None,
            ir: IRView = "diff") -> str:
    """A readable account of what :func:`moleforge.compile` would build; the model is not changed.

    Args:
        spec: an :class:`AdapterSpec`, a dict, JSON text or a preset name.
        passes: the pipeline to explain (default: ``DEFAULT_PIPELINE``; ``()`` for none).
        siblings: explain with sibling fusion (default: with the default pipeline).
        ir: ``"diff"`` the plain IR, each pass's changes and the final IR; ``"full"`` the whole
            IR after every pass; ``"none"`` no IR.

    Example:
        >>> print(mf.explain("molora", model))  # doctest: +SKIP
    """
    from .compile import as_spec, build_site_graphs

    spec = as_spec(spec)
    sites, plain, final = build_site_graphs(spec, model, passes, siblings=False)
    pipeline = DEFAULT_PIPELINE if passes is None else tuple(passes)
    note = ""
    if (passes is None) if siblings is None else siblings:
        found = find_siblings(model, list(final))
        final, note = fuse_sibling_sites(final, found.groups), found.note
    rows = site_rows([s.name for s in sites], plain, final)
    return explain_graphs(spec.name or "adapter", type(model).__name__, rows, pipeline, note, ir)


def site_rows(names, plain: dict[str, Graph], final: dict[str, Graph]) -> list[_Site]:
    return [_Site(n, plain[n], final[n]) for n in names]


def explain_graphs(spec_name: str, model_name: str, sites: list[_Site], pipeline: Sequence[Pass],
                   sibling_note: str = "", ir: IRView = "diff") -> str:
    """The explanation of already built graphs (what ``handle.explain()`` uses)."""
    groups: dict[tuple[str, str], list[_Site]] = {}
    for s in sites:
        groups.setdefault((_shape_text(s.plain), _shape_text(s.final)), []).append(s)
    trainable = sum(math.prod(p.shape) for s in sites for p in s.final.params if p.trainable)
    names = " -> ".join(_pass_name(p) for p in pipeline) or "none"
    head = [f"moleforge explain: {spec_name!r} on {model_name}",
            f"  {len(sites)} adapted linears in {len(groups)} groups of identical sites; "
            f"{trainable:,} trainable parameters",
            f"  passes: {names}"]
    if sibling_note:
        head.append(f"  sibling fusion: {sibling_note}")
    blocks, shown = [], {}
    for members in groups.values():
        structure = _structure(members[0])
        blocks.append(_group(members, pipeline, ir, shown.get(structure)))
        shown.setdefault(structure, _where([m.name for m in members]))
    return "\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"


def _structure(site: _Site) -> tuple[str, str]:
    """The IR with every number masked: groups that differ only in widths show their IR once."""
    return tuple(re.sub(r"\d+", "#", _shape_text(g)) for g in (site.plain, site.final))  # type: ignore[return-value]


def _pass_name(p: Pass) -> str:
    name = getattr(p, "__name__", repr(p))
    return f"{name}(tokens={p.tokens})" if isinstance(p, ChoosePoolKernels) else name


def _shape_text(g: Graph) -> str:
    """The printed graph without its label and with sibling groups reduced to their member parts."""
    text = print_graph(g.replace(label=""))
    return re.sub(r"group=\S*?(\{[^}]*\})", r"group=\1", text)


def _where(names: list[str]) -> str:
    """``model.layers.{0,1,2,3}.self_attn.q_proj`` for names differing in one dotted part."""
    parts = [n.split(".") for n in names]
    if len(names) == 1 or len({len(p) for p in parts}) != 1:
        return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1:
        return f"{names[0]} and {len(names) - 1} more"
    i = differ[0]
    return ".".join(parts[0][:i] + ["{" + ",".join(p[i] for p in parts) + "}"] + parts[0][i + 1:])


def _field(name: str, text: str) -> list[str]:
    return textwrap.wrap(text, 104, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15,
                         break_on_hyphens=False)


def _group(members: list[_Site], pipeline: Sequence[Pass], ir: IRView, same_as: str | None) -> str:
    first = members[0]
    g, final = first.plain, first.final
    count = f"{len(members)} sites" if len(members) > 1 else "1 site"
    lines = [f"== {_where([m.name for m in members])}  ({count}, d_in {g.d_in} -> d_out {g.d_out})"]
    lines += _field("adapter", _describe(g))
    lines += _field("parameters", _parameters(g))
    lines += _field("FLOPs/token", _flops(g, final))
    lines += _field("base FLOPs", _base_flops(final))
    lines += _field("kernel", _kernel(final, pipeline))
    sib = next((n for n in final.nodes if isinstance(n, SiblingLinear)), None)
    if sib is not None:
        members_text = sib.group[sib.group.find("{"):] if "{" in sib.group else sib.group
        lines += _field("siblings", f"one input GEMM for {members_text}; this site reads its columns "
                                    f"{sib.start}:{sib.stop}")
    lines += _field("Γ", _gamma(g))
    if ir == "none":
        return "\n".join(lines)
    if same_as is not None:
        lines.append(f"  IR           as for {same_as} above, with this site's widths")
        return "\n".join(lines)
    lines.append("  IR")
    lines += _ir(first, pipeline, ir)
    return "\n".join(lines)


def _flops(plain: Graph, final: Graph) -> str:
    """Forward FLOPs per token of the plain and the optimised graph, and of the plain graph with
    its pools computed for the selected experts only."""
    text = f"forward {flops_per_token(plain):,} plain -> {flops_per_token(final):,} optimised"
    sparse = group_pools(plain)
    if sparse is not plain:
        text += f" (the selected experts alone: {flops_per_token(sparse):,})"
    return text


def _base_flops(final: Graph) -> str:
    """Forward FLOPs per token of the frozen module the site adapts."""
    where = ("in the frozen block (included above: the routed block replaces it)" if final.frozen
             else "in the frozen linear (the adapter runs beside it)")
    return f"{base_flops_per_token(final):,} per token {where}"


def _parameters(g: Graph) -> str:
    trainable = {p.name: math.prod(p.shape) for p in g.params if p.trainable}
    frozen = {p.name: math.prod(p.shape) for p in g.params if not p.trainable}
    text = f"{sum(trainable.values()):,} trainable per site"
    if trainable:
        text += ": " + ", ".join(f"{k}={v:,}" for k, v in trainable.items())
    if frozen:
        text += "; buffers " + ", ".join(f"{k}={v:,}" for k, v in frozen.items())
    return text


def _router_text(route: Route) -> str:
    gate = route.gate
    kind = type(gate).__name__
    words = {"SoftmaxTopK": "softmax top-{k}", "SigmoidTopK": "sigmoid top-{k} (balancing bias)",
             "AbsTopK": "|h| top-{k} mask (FlyLoRA)", "DenseSoftmax": "dense softmax"}[kind]
    return words.format(k=getattr(gate, "k", ""))


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
    return f"pool of {route.experts} experts of rank {rank}{shared}, {_router_text(route)}{extra}{tail}"


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
    k = getattr(route.gate, "k", None)
    form = (f"grouped GEMMs over each token's top-{k} experts ({k * rank} of {E * rank} ranks)"
            if isinstance(n, GroupedMix) else f"dense block-gated LoRA of rank {E * rank}")
    if k is None or isinstance(route.gate, DenseSoftmax):
        return form
    cost = pool_cost(E, rank, g.d_in, g.d_out, k, tokens)
    return f"{form}; cost model at {tokens:,} tokens: dense {cost.dense / 1e6:.0f}M vs grouped " \
           f"{cost.grouped / 1e6:.0f}M multiply-add equivalents"


def _gamma(g: Graph) -> str:
    tree = next((n for n in g.nodes if isinstance(n, TreeRoute)), None)
    if tree is not None:
        value, F, terms = 1, 1, []
        for lv in reversed(tree.levels):
            value *= math.comb(lv.experts, lv.fanout) ** F
            terms.append(f"C({lv.experts},{lv.fanout})^{F}")
            F *= lv.fanout
        return f"{value:,} = " + " x ".join(terms) + " routing structures per token"
    route = next((n for n in g.nodes if isinstance(n, Route)), None)
    k = getattr(getattr(route, "gate", None), "k", None)
    if route is None or k is None:
        return "1 (no top-k routing)"
    return f"{math.comb(route.experts, k):,} = C({route.experts},{k}) expert sets per token"


def _node_lines(g: Graph) -> list[str]:
    return [ln for ln in print_graph(g).splitlines()[1:] if not ln.startswith("  param ")]


def _ir(site: _Site, pipeline: Sequence[Pass], ir: IRView) -> list[str]:
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
