"""``merge_cores``: CoMoL's mixture of full core-space experts becomes one soft-merged core per
token (METHODS.md §9, §20.4).

Identity. Expert i is the up-projection ``B M_i`` of the shared core-space token ``h = A x``, so

    core_experts(h, g, M, B, s) = Σ_i g_i · s · B (M_i h) = s · B ((Σ_i g_i M_i) h)
                                = linear(core_merge(h, g, M), B, scale=s)

by linearity of ``B`` and of the matrix-vector product in ``M``. Exact for every gate (dense,
top-k: the gates are any per-token weights). FLOPs per token ``2·E·r·(r + d_out)`` become
``2·E·r² + 2·r·d_out``: the experts' ``d_out``-wide products collapse into one.
Precondition: a :class:`CoreExperts` node; other graphs are returned unchanged.
"""

from __future__ import annotations

from ..ir import CoreExperts, CoreMerge, Graph, Linear
from ._rewrite import rewrite_nodes

__all__ = ["merge_cores"]


def merge_cores(graph: Graph) -> Graph:
    """Rewrite every :class:`CoreExperts` into a :class:`CoreMerge` and the shared up-projection."""
    def rule(n, g, ids):
        if not isinstance(n, CoreExperts):
            return None
        merged = CoreMerge(id=ids.new(f"{n.id}_core"), src=n.src, routing=n.routing, cores=n.cores, origin=n.origin)
        return merged, Linear(id=n.id, src=merged.id, weight=n.b, scale=n.scale, origin=n.origin)
    return rewrite_nodes(graph, rule)
