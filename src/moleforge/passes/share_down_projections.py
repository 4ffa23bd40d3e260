"""``share_down_projections``: a down-projection shared (or tied) by all experts is computed
once (METHODS.md §20.3, HydraLoRA; CoMoL's shared ``V_A`` is the same case).

Identity. With ``A_i = A`` for every expert (stored as ``A`` with E = 1) and ``h = x Aᵀ (T, r)``,

    Σ_i g_i · s · (x Aᵀ) B_iᵀ = (s · (g ⊗ h)) B_catᵀ
    pool_mix(x, g, A, B, s)   = linear(outer_gate(linear(x, A[0]), g, s), cols(B))

where ``g ⊗ h (T, E·r)`` is the per-token outer product flattened expert-major, matching the
columns of ``B_cat = cols(B)``. The per-token merged head ``Σ_i g_i B_i`` is never formed.
Down-projection cost ``T·r·d_in`` instead of ``T·E·r·d_in``. Exact for any gate. A shared
up-projection as well (both factors with E = 1) reads ``cat(B[0], …, B[0])``.
Precondition: ``A`` has E = 1 and the router more than one expert (one expert is a plain
LoRA, see ``fold_static_gates``).
"""

from __future__ import annotations

from ..ir import Linear, OuterGate, Pick, PoolMix, expr_shape
from ._rewrite import rewrite_nodes
from .stack_pools import up_weight

__all__ = ["share_down_projections", "share_down", "shared_down"]


def shared_down(n, graph) -> bool:
    return isinstance(n, PoolMix) and expr_shape(n.a)[0] == 1 and graph.routing(n.routing).experts > 1


def share_down(n: PoolMix, graph, ids) -> tuple:
    """The three nodes replacing one pool with a shared A (the last keeps the pool's id)."""
    E = graph.routing(n.routing).experts
    down = Linear(id=ids.new(f"{n.id}_down"), src=n.src, weight=Pick(n.a, 0), origin=n.origin)
    gated = OuterGate(id=ids.new(f"{n.id}_gated"), src=down.id, routing=n.routing, scale=n.scale, origin=n.origin)
    return (down, gated, Linear(id=n.id, src=gated.id, weight=up_weight(n.b, E), origin=n.origin))


def share_down_projections(graph):
    """Rewrite every pool whose experts share one down-projection into the compute-once form."""
    return rewrite_nodes(graph, lambda n, g, ids: share_down(n, g, ids) if shared_down(n, g) else None)
