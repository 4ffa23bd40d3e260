"""``fuse_shared_input_linears``: linears of one site that read the same tensor become one GEMM
(METHODS.md §20.11: the router's weights appended to the down-projection; S'MoRE's router
down-projection appended to the all-residuals GEMM; a shared expert's down-projection too).

Identity. For linears ``y_j = s · (src W_jᵀ) + b_j`` with the same ``src`` and scale,

    [y_1 | y_2 | …] = s · (src · cat(W_1, W_2, …)ᵀ) + cat(b_1, b_2, …)
    y_j             = columns(fused, o_j, o_j + out_j)

One read of ``src`` instead of one per linear, one bigger GEMM instead of several thin ones,
and in the backward pass one GEMM for the gradient of ``src``. Exact (it is the same sums,
grouped). Preconditions: same source and scale, and either all have a bias or none does.
The fused node takes the place of the first member, so the order stays topological; the
column slices keep the members' ids, so consumers are untouched.
"""

from __future__ import annotations

from collections import defaultdict

from ..ir import Columns, Concat, Linear, ParamExpr, expr_shape
from ._rewrite import Ids, prune

__all__ = ["fuse_shared_input_linears", "flat_concat"]


def flat_concat(parts: list[ParamExpr], dim: int = 0) -> ParamExpr:
    """``cat`` of ``parts`` with nested concatenations along the same dim flattened."""
    flat: list[ParamExpr] = []
    for p in parts:
        if isinstance(p, Concat) and p.dim == dim:
            inner = flat_concat(list(p.parts), dim)
            flat.extend(inner.parts if isinstance(inner, Concat) else (inner,))
        else:
            flat.append(p)
    return flat[0] if len(flat) == 1 else Concat(tuple(flat), dim)


def _groups(graph) -> list[list[Linear]]:
    groups: dict[tuple, list[Linear]] = defaultdict(list)
    for n in graph.nodes:
        if isinstance(n, Linear):
            groups[(n.src, n.scale, n.bias is None)].append(n)
    return [g for g in groups.values() if len(g) > 1]


def _fused(members: list[Linear], ids: Ids) -> list:
    first = members[0]
    weight = flat_concat([m.weight for m in members])
    bias = None if first.bias is None else flat_concat([m.bias for m in members])
    fused = Linear(id=ids.new(f"{first.src}_gemm"), src=first.src, weight=weight, bias=bias, scale=first.scale,
                   origin=first.origin)
    out, start = [fused], 0
    for m in members:
        stop = start + expr_shape(m.weight)[0]
        out.append(Columns(id=m.id, src=fused.id, start=start, stop=stop, origin=m.origin))
        start = stop
    return out


def fuse_shared_input_linears(graph):
    """Fuse every group of same-source linears into one GEMM plus column slices."""
    groups = _groups(graph)
    if not groups:
        return graph
    ids = Ids(graph)
    first_of = {g[0].id: g for g in groups}
    member = {m.id for g in groups for m in g}
    nodes: list = []
    for n in graph.nodes:
        if n.id in first_of:
            nodes.extend(_fused(first_of[n.id], ids))
        elif n.id not in member:
            nodes.append(n)
    return prune(graph.replace(nodes=tuple(nodes)))
