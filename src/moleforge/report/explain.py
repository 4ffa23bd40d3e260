"""``explain(plan)``: a readable account of what the compiler made of each site of a plan
(``mf.explain(spec, model)`` plans and explains; ``handle.explain()`` explains the handle's plan).

For every group of identical sites (same plain IR, same optimised IR): where they are, the
adapter, its parameters, forward FLOPs per token before and after the passes (next to the
frozen module's; counted by :mod:`.flops`, as ``moleforge inspect`` counts them), the kernel the
lowering runs (with the cost model's estimates for pools), the sibling sites it shares its
input GEMM with, Γ (routing structures per token), and the IR: the plain graph, what each pass
changed, and the final graph, as the plan recorded them.

FFN-block sites (``scope: "ffn_block"``) are described in the same fields, plus the block as
recognised (its linears by their paths in the model, its activation) and the split of its FLOPs
into the adapter's and the frozen block's.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import TYPE_CHECKING, Literal, Sequence

from ..backends.torch_fx.lower_decode import pool_decode_form
from ..ir import (
    AuxLoss,
    BlockGate,
    ExpertFFN,
    ExpertHidden,
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
    XLoRAScale,
    expr_shape,
    nodes,
    print_graph,
)
from ..passes import ChoosePoolKernels, Pass, group_pools, pool_cost
from .explain_blocks import block_fields
from .explain_sources import sources_lines, task_text
from .explain_text import SiteRow, block_node, field, gamma_text, parameters_text, router_text, where
from .explain_xlora import classifier_parameters, xlora_lines
from .flops import base_flops_per_token, flops_per_token

if TYPE_CHECKING:
    from ..compiler.planner import Plan, PlannedSite

__all__ = ["explain_plan", "site_row"]

IRView = Literal["diff", "full", "none"]


def explain_plan(plan: Plan, ir: IRView = "diff") -> str:
    """The explanation of ``plan``: a pure function of it (nothing is rebuilt or rerun).

    Args:
        ir: ``"diff"`` the plain IR, each pass's changes and the final IR; ``"full"`` the whole
            IR after every pass; ``"none"`` no IR.
    """
    sites = [site_row(s) for s in plan.sites]
    groups: dict[tuple[str, str], list[SiteRow]] = {}
    for s in sites:
        groups.setdefault((_shape_text(s.plain), _shape_text(s.final)), []).append(s)
    xlora_sites = sum(isinstance(n, Route) and isinstance(n.gate, XLoRAScale)
                      for s in plan.sites for n in s.plain.nodes)
    trainable = sum(math.prod(p.shape) for s in sites for p in s.final.params if p.trainable)
    trainable += classifier_parameters(plan.spec, plan.hidden_size, xlora_sites)
    head = [f"moleforge explain: {plan.spec.name or 'adapter'!r} on {plan.model_name}",
            f"  {_count_sites(sites)} in {len(groups)} groups of identical sites; {trainable:,} trainable parameters",
            f"  passes: {_pass_names(plan.pipeline)}"]
    if plan.sibling_note:
        head.append(f"  sibling fusion: {plan.sibling_note}")
    head += [f"  kernels: {line}" for line in plan.policy.describe(_kernel_families(sites))]
    head += sources_lines(plan.spec)
    head += xlora_lines(plan.spec, xlora_sites, plan.hidden_size)
    texts, shown = [], {}
    for members in groups.values():
        structure = _structure(members[0])
        texts.append(_group(members, plan.pipeline, ir, shown.get(structure), plan.policy.decode_tokens))
        shown.setdefault(structure, where([m.name for m in members]))
    return "\n".join(head) + "\n\n" + "\n\n".join(texts) + "\n"


def _kernel_families(sites: list[SiteRow]) -> list[str]:
    """The op families whose kernel the policy chooses that these sites run."""
    kinds = {type(n) for s in sites for n in s.final.nodes}
    used = {"grouped": GroupedMix in kinds, "tree": bool(kinds & {TreeMix, TreePropagate}),
            "routed_ffn": bool(kinds & {ExpertFFN, ExpertHidden}),
            "decode": bool(kinds & {Route, TreeRoute})}
    return [family for family, yes in used.items() if yes]


def site_row(site: PlannedSite) -> SiteRow:
    """A planned site as explained; a block with the model path of each of its linears."""
    block = site.block
    linears = None if block is None else {r: block.traced.full_name(r) for r in block.traced.linears}
    return SiteRow(site.name, site.plain, site.final, linears, site.trace)


def _is_block(site: SiteRow) -> bool:
    return block_node(site.plain) is not None


def _count_sites(sites: list[SiteRow]) -> str:
    blocks = sum(_is_block(s) for s in sites)
    if not blocks:
        return f"{len(sites)} adapted linears"
    text = f"{blocks} FFN block" + ("s" if blocks > 1 else "")
    return f"{len(sites) - blocks} adapted linears and {text}" if len(sites) > blocks else text


def _pass_names(pipeline: Sequence[Pass]) -> str:
    return " -> ".join(_pass_name(p) for p in pipeline) or "none"


def _structure(site: SiteRow) -> tuple[str, str]:
    """The IR with every number masked: groups that differ only in widths show their IR once."""
    return tuple(re.sub(r"\d+", "#", _shape_text(g)) for g in (site.plain, site.final))  # type: ignore[return-value]


def _pass_name(p: Pass) -> str:
    name = getattr(p, "__name__", repr(p))
    if not isinstance(p, ChoosePoolKernels):
        return name
    return f"{name}(tokens={p.tokens}, kernel={p.kernel})" if p.kernel != "torch" else f"{name}(tokens={p.tokens})"


def _shape_text(g: Graph) -> str:
    """The printed graph without its label and with sibling groups reduced to their member parts."""
    text = print_graph(g.replace(label=""))
    return re.sub(r"group=\S*?(\{[^}]*\})", r"group=\1", text)


def _group(members: list[SiteRow], pipeline: Sequence[Pass], ir: IRView, same_as: str | None,
           decode_tokens: int = 0) -> str:
    first = members[0]
    lines = block_fields(members) if _is_block(first) else _linear_fields(members, pipeline, decode_tokens)
    if ir == "none":
        return "\n".join(lines)
    if same_as is not None:
        lines.append(f"  IR           as for {same_as} above, with this site's widths")
        return "\n".join(lines)
    lines.append("  IR")
    lines += _ir(first, ir)
    return "\n".join(lines)


def _count(members: list[SiteRow]) -> str:
    return f"{len(members)} sites" if len(members) > 1 else "1 site"


def _linear_fields(members: list[SiteRow], pipeline: Sequence[Pass], decode_tokens: int = 0) -> list[str]:
    first = members[0]
    g, final = first.plain, first.final
    lines = [f"== {where([m.name for m in members])}  ({_count(members)}, d_in {g.d_in} -> d_out {g.d_out})"]
    lines += field("adapter", _describe(g))
    lines += field("parameters", parameters_text(g))
    lines += field("FLOPs/token", _flops(g, final))
    lines += field("base FLOPs", _base_flops(final))
    lines += field("kernel", _kernel(final, pipeline, decode_tokens) + _pool_decode(g, decode_tokens))
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
    aux += [f"z_loss {n.weight:g}" for n in g.nodes if isinstance(n, nodes.ZLoss)]
    aux += [f"task_contrastive {n.weight:g}" for n in g.nodes if isinstance(n, nodes.TaskContrastive)]
    aux += [f"preserve {n.weight:g}" for n in g.nodes if isinstance(n, nodes.Preserve)]
    tail = f"; aux {', '.join(aux)}" if aux else ""
    tree = next((n for n in g.nodes if isinstance(n, TreeMix)), None)
    if tree is not None:
        route = g.node(tree.routing)
        levels = ", ".join(f"{lv.b.shape[0]}x rank {lv.b.shape[2]} (fanout {gl.fanout})"
                           for lv, gl in zip(tree.levels, route.levels))
        return f"residual tree [{levels}], {tree.activation}, {route.gate} gate{tail}"
    route = next((n for n in g.nodes if isinstance(n, Route)), None)
    kron = next((n for n in g.nodes if isinstance(n, nodes.KroneckerMix)), None)
    if kron is not None and route is not None:
        return f"{_kronecker_text(g, kron)}, {router_text(route)}{tail}"
    if route is None:
        rank = next(n for n in g.nodes if isinstance(n, Linear)).weight.shape[0]  # type: ignore[union-attr]
        return f"LoRA of rank {rank}"
    pool = next((n for n in g.nodes if isinstance(n, (PoolMix, GroupedMix, BlockGate, nodes.RaggedMix,
                                                      nodes.PoolMagnitude))), None)
    stacked = isinstance(pool, (PoolMix, GroupedMix, nodes.PoolMagnitude))
    rank = expr_shape(pool.a)[1] if stacked else getattr(pool, "rank", "?")
    ranks = f"ranks {list(pool.ranks)}" if isinstance(pool, nodes.RaggedMix) else f"rank {rank}"
    shared = " (one shared A)" if isinstance(pool, (PoolMix, nodes.PoolMagnitude)) and expr_shape(pool.a)[0] == 1 \
        else ""
    shared += " with DoRA magnitudes" if isinstance(pool, nodes.PoolMagnitude) else ""
    return (f"pool of {route.experts} experts of {ranks}{shared}, {router_text(route)}{task_text(g)}{_capacity_text(g)}"
            f"{_shared_text(g)}{tail}")


def _kronecker_text(g: Graph, n: nodes.KroneckerMix) -> str:
    """EPT's experts: kernels, meta-seed rank, task embeddings and factors."""
    embed = next((m for m in g.nodes if isinstance(m, nodes.TaskEmbed)), None)
    scale = next((m for m in g.nodes if isinstance(m, nodes.TaskScale)), None)
    tasks = "" if embed is None else f" on the token plus its task's embedding ({embed.table.shape[0]} tasks)"
    factors = "" if scale is None else f", per-task factors {list(scale.factors)}"
    return (f"{len(n.kernels)} Kronecker experts (meta-seed rank {n.a.shape[0]}, kernels {list(n.sizes())})"
            f"{tasks}{factors}")


def _capacity_text(g: Graph) -> str:
    cap = next((n for n in g.nodes if isinstance(n, nodes.CapacityLimit)), None)
    return "" if cap is None else f", capacity factor {cap.factor:g} (tokens over capacity pass the expert by)"


def _shared_text(g: Graph) -> str:
    """The always-on shared expert(s): ``shared_A`` (one LoRA) or ``shared{j}_A`` (DeepSeek-style groups)."""
    always = g.param_decls.get("shared_A")
    if always is not None:
        return f", plus an always-on shared LoRA of rank {always.shape[0]}"
    group = [d for name, d in g.param_decls.items() if name.startswith("shared") and name.endswith("_A")]
    if not group:
        return ""
    return f", plus {len(group)} always-on shared LoRA experts of rank {group[0].shape[0]}"


def _kernel(final: Graph, pipeline: Sequence[Pass], decode_tokens: int = 0) -> str:
    chooser = next((p for p in pipeline if isinstance(p, ChoosePoolKernels)), ChoosePoolKernels())
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
        if isinstance(n, nodes.PoolMagnitude):
            return "DoRA experts: the frozen product once, every expert's LoRA as one batched product"
        if isinstance(n, nodes.KroneckerMix):
            tokens_of = "over its routed tokens" if final.routing(n.routing).sparse else "on every token"
            return ("Kronecker experts by the vec trick, grouped by kernel size: Z X by the meta-seed's two GEMMs, "
                    f"then each token's merged kernel (no d_out x d_in matrix), each group {tokens_of}")
        if isinstance(n, nodes.RaggedMix):
            return ("experts of their own ranks: one pair of GEMMs per selected expert over its tokens"
                    if n.grouped else
                    f"experts of their own ranks: dense block-gated LoRA of rank {sum(n.ranks)}")
        if isinstance(n, (GroupedMix, BlockGate, OuterGate)):
            return _pool_kernel(final, n, chooser) + _decode_kernel(final, n, decode_tokens)
    return "plain LoRA: two GEMMs"


def _pool_kernel(g: Graph, n, chooser: ChoosePoolKernels) -> str:
    route = g.node(n.routing)
    if isinstance(route, nodes.CapacityLimit):  # the gate is that of the routing it limits
        route = g.node(route.routing)
    E = route.experts
    if isinstance(n, OuterGate):
        return f"shared down-projection once, outer-product gate, one up-projection of rank {g.width(n.id)}"
    rank = expr_shape(n.a)[1] if isinstance(n, GroupedMix) else n.rank
    k = route.gate.k
    kernel = chooser.kernel if isinstance(n, GroupedMix) and not g.routing(n.routing).variable else "torch"
    grouped = ("the compiled CPU kernel: each token's top-{k} experts ({kr} of {er} ranks), forward and backward, "
               "reading the token rows in place" if kernel == "cpu" else
               "grouped GEMMs over each token's top-{k} experts ({kr} of {er} ranks)")
    form = (grouped.format(k=k, kr=k * rank, er=E * rank)
            if isinstance(n, GroupedMix) else f"dense block-gated LoRA of rank {E * rank}")
    if k is None:
        return form
    tokens = chooser.tokens
    cost = pool_cost(E, rank, g.d_in, g.d_out, k, tokens, chooser.kernel)
    return f"{form}; cost model at {tokens:,} tokens: dense {cost.dense / 1e6:.0f}M vs grouped " \
           f"{cost.grouped / 1e6:.0f}M multiply-add equivalents"


def _decode_kernel(g: Graph, n, decode_tokens: int) -> str:
    """Which form a grouped pool takes at the decode path's sizes (``KernelPolicy.decode_tokens``)."""
    if not isinstance(n, GroupedMix) or decode_tokens == 0:
        return ""
    E, rank = g.routing(n.routing).experts, expr_shape(n.a)[1]
    return f"; at <= {decode_tokens} tokens (decode path): all {E * rank} ranks in one dense GEMM, gated after"


def _pool_decode(plain: Graph, decode_tokens: int) -> str:
    """The decode form's line when the site has one (``torch_fx/lower_decode.py``)."""
    form = pool_decode_form(plain)
    if form is None or decode_tokens == 0:
        return ""
    where = f"; decode step (<= {decode_tokens} tokens, no autograd, CPU float32/float64)"
    chosen = f"top-{form.k}" if form.gate == "softmax_topk" else "the dense gate"
    return (f"{where}: router, {chosen} and each token's selected experts' factors in one call of the compiled "
            "CPU kernel")


def _node_lines(g: Graph) -> list[str]:
    return [ln for ln in print_graph(g).splitlines()[1:] if not ln.startswith("  param ")]


def _ir(site: SiteRow, ir: IRView) -> list[str]:
    out = ["    plain", *("    " + ln for ln in _node_lines(site.plain))]
    prev = site.plain
    for name, g in site.trace:
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
    if ir == "diff" and site.trace:
        out += ["    final", *("    " + ln for ln in _node_lines(site.final))]
    return out
