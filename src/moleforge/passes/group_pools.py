"""``group_pools``: a pool under a sparse (top-k) router computes only the selected experts.

Identity. ``g_i = 0`` for every expert outside a token's top-k set, so

    pool_mix(x, g, A, B, s) = Σ_{i ∈ top-k(x)} g_i · s · (x A_iᵀ) B_iᵀ = grouped_mix(x, g, A, B, s)

where ``grouped_mix`` gathers each expert's tokens, runs its two small GEMMs and scatters the
gated result back (a grouped GEMM): FLOPs ``T·k·r·(d_in + d_out)`` instead of
``T·E·r·(d_in + d_out)``, plus moving ``T·k·(d_in + d_out)`` values. Exact for every sparse gate
(softmax top-k, sigmoid top-k, FlyLoRA's mask). Precondition: the pool's router is a
top-k :class:`Route`; dense routers are left unchanged.
"""

from __future__ import annotations

from ..ir import GroupedMix, PoolMix, RoutingType
from ._rewrite import rewrite_nodes

__all__ = ["group_pools", "group_pool", "sparse_k"]


def sparse_k(graph, rid: str) -> int | None:
    """k of a top-k router; ``None`` for a dense one."""
    t = graph.type(rid)
    return t.k if isinstance(t, RoutingType) else None


def group_pool(n: PoolMix, graph, ids) -> tuple:
    return (GroupedMix(id=n.id, src=n.src, routing=n.routing, a=n.a, b=n.b, scale=n.scale, origin=n.origin),)


def group_pools(graph):
    """Rewrite every pool under a sparse router into a :class:`GroupedMix`."""
    def rule(n, g, ids):
        return group_pool(n, g, ids) if isinstance(n, PoolMix) and sparse_k(g, n.routing) is not None else None
    return rewrite_nodes(graph, rule)
