"""``stack_pools``: an expert pool is one LoRA of rank E·r whose rank blocks are gated
(METHODS.md §20.1, the SMoRA identity).

Identity. With ``A_cat = rows(A) (E·r, d_in)``, ``B_cat = cols(B) (d_out, E·r)`` and
``ĝ = repeat(s·g, r)`` (each gate repeated over its expert's r rank columns),

    Σ_i g_i · s · (x A_iᵀ) B_iᵀ = ((x A_catᵀ) ⊙ ĝ) B_catᵀ
    pool_mix(x, g, A, B, s)     = linear(block_gate(linear(x, rows(A)), g, r, s), cols(B))

Exact for any gate (dense, sparse, per token). Cost: one ``d_in -> E·r`` GEMM, an elementwise
scale and one ``E·r -> d_out`` GEMM instead of E pairs of rank-r GEMMs; FLOPs
``T·E·r·(d_in + d_out)`` whatever the sparsity (``group_pools`` is the sparse alternative,
``choose_pool_kernels`` picks). A shared up-projection (``B`` stored with E = 1) is the same
block repeated: ``cat(B[0], …, B[0])``. Pools with a shared down-projection (``A`` with E = 1)
are left to ``share_down_projections``, which computes it once.
"""

from __future__ import annotations

from ..ir import BlockColumns, BlockGate, BlockRows, Concat, Linear, Pick, PoolMix, expr_shape
from ._rewrite import rewrite_nodes

__all__ = ["stack_pools", "stack_pool", "up_weight"]


def up_weight(b, experts: int):
    """``(d_out, E·r)``: the stacked up-projection, a shared B repeated per expert."""
    if expr_shape(b)[0] == experts:
        return BlockColumns(b)
    return Concat((Pick(b, 0),) * experts, 1)


def stack_pool(n: PoolMix, graph, ids) -> tuple:
    """The three nodes replacing one pool (the last keeps the pool's id)."""
    E = graph.routing(n.routing).experts
    _, r, _ = expr_shape(n.a)
    down = Linear(id=ids.new(f"{n.id}_down"), src=n.src, weight=BlockRows(n.a), origin=n.origin)
    gated = BlockGate(id=ids.new(f"{n.id}_gated"), src=down.id, routing=n.routing, rank=r, scale=n.scale,
                      origin=n.origin)
    return (down, gated, Linear(id=n.id, src=gated.id, weight=up_weight(n.b, E), origin=n.origin))


def stackable(n, graph) -> bool:
    return isinstance(n, PoolMix) and expr_shape(n.a)[0] == graph.routing(n.routing).experts


def stack_pools(graph):
    """Rewrite every pool with per-expert down-projections into its block-gated stacked form."""
    return rewrite_nodes(graph, lambda n, g, ids: stack_pool(n, g, ids) if stackable(n, g) else None)
