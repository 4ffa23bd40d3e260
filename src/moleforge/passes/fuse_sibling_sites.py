"""``fuse_sibling_sites``: sibling sites that read the same tensor (q/k/v; gate/up) compute
their first GEMMs as one (METHODS.md §20.11, horizontal fusion across sites).

Identity. For sites whose input-reading linears are ``y_j = x W_jᵀ + b_j`` on the same ``x``,

    [y_1 | … | y_n] = x · cat(W_1, …, W_n)ᵀ + cat(b_1, …, b_n),   y_j = columns o_j … o_j + out_j

Each member's linear becomes a :class:`SiblingLinear` with the same weight and bias (so its
value, and the interpreter's, is unchanged) that names the group and its columns; the backend
computes the group's GEMM once per input and hands each member its slice. Exact; the group is
a scheduling fact, not new math. Which sites are siblings is a fact about the model (found by
the compiler, not here). Preconditions: each member has exactly one unscaled linear reading its
input (after ``fuse_shared_input_linears``); members without one are left out of the group, and
a group left with fewer than two members is not formed.

Unlike the other passes this one maps a set of graphs to a set of graphs; it is pure in the
same sense.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..ir import Graph, Linear, SiblingLinear, expr_shape

__all__ = ["fuse_sibling_sites", "group_name"]


def _entry(graph: Graph) -> Linear | None:
    """The site's one fusable linear of its input, if it has exactly one."""
    x = graph.input_node().id
    reads = [n for n in graph.nodes if isinstance(n, Linear) and n.src == x]
    if len(reads) != 1 or reads[0].scale != 1.0:
        return None
    return reads[0]


def group_name(members: Sequence[str]) -> str:
    """``model.layers.0.self_attn.{q_proj,k_proj,v_proj}``: the common prefix and the parts."""
    parts = [m.split(".") for m in members]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    head = ".".join(parts[0][:common])
    tails = ",".join(".".join(p[common:]) for p in parts)
    return f"{head}.{{{tails}}}" if head else f"{{{tails}}}"


def _fuse_group(graphs: Mapping[str, Graph], names: Sequence[str]) -> dict[str, Graph]:
    entries = {n: _entry(graphs[n]) for n in names}
    members = [n for n in names if entries[n] is not None]
    if len(members) < 2:
        return {}
    group = group_name(members)
    out, start = {}, 0
    for name in members:
        lin = entries[name]
        stop = start + expr_shape(lin.weight)[0]
        node = SiblingLinear(id=lin.id, src=lin.src, weight=lin.weight, bias=lin.bias, group=group,
                             start=start, stop=stop, origin=lin.origin)
        g = graphs[name]
        out[name] = g.replace(nodes=tuple(node if n.id == lin.id else n for n in g.nodes))
        start = stop
    return out


def fuse_sibling_sites(graphs: Mapping[str, Graph], groups: Sequence[Sequence[str]]) -> dict[str, Graph]:
    """Return ``graphs`` with every group of sibling sites sharing one input GEMM.

    Args:
        graphs: ``{site name: graph}``.
        groups: lists of site names that read the same tensor in the model.
    """
    out = dict(graphs)
    for names in groups:
        out.update(_fuse_group(graphs, [n for n in names if n in graphs]))
    return out
