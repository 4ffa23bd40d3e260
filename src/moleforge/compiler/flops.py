"""Forward FLOPs per token of a site graph (2 per multiply-add of a GEMM, 1 per elementwise
product), for ``explain``. Routing softmaxes, top-k and aux losses are not counted."""

from __future__ import annotations

import math

from ..ir import (
    BlockGate,
    GateBias,
    Graph,
    GroupedMix,
    Linear,
    OuterGate,
    PoolMix,
    SiblingLinear,
    TreeMix,
    TreePropagate,
    TreeRoute,
    expr_shape,
)

__all__ = ["forward_flops"]


def forward_flops(graph: Graph) -> float:
    """FLOPs of one token's forward pass through ``graph``."""
    return sum(_node(graph, n) for n in graph.nodes)


def _node(g: Graph, n) -> float:  # noqa: C901 - one case per node kind
    match n:
        case Linear() | SiblingLinear():
            out, inp = expr_shape(n.weight)
            return 2.0 * out * inp
        case PoolMix():
            E, (_, r, d_in), d_out = g.width(n.routing), expr_shape(n.a), g.width(n.id)
            return 2.0 * E * r * (d_in + d_out)  # every expert, gated after the fact
        case GroupedMix():
            k = g.node(n.routing).gate.k  # type: ignore[union-attr]
            _, r, d_in = expr_shape(n.a)
            return 2.0 * k * r * (d_in + g.width(n.id))
        case BlockGate() | OuterGate() | GateBias():
            return float(g.width(n.id))
        case TreeRoute():
            return _router(n)
        case TreeMix():
            down = sum(2.0 * lv.a.shape[0] * lv.a.shape[1] * lv.a.shape[2] for lv in n.levels)
            return down + _propagate(g, n)
        case TreePropagate():
            return _propagate(g, n)
    return 0.0


def _slots(route: TreeRoute) -> list[int]:
    """Tree nodes drawn from each pool, ``F_l = Π_{j ≥ l} f_j``."""
    out, F = [0] * len(route.levels), 1
    for l in reversed(range(len(route.levels))):
        F *= route.levels[l].fanout
        out[l] = F
    return out


def _router(n: TreeRoute) -> float:
    """Query MLP and key scores for every context of every pool."""
    total, contexts = 0.0, 1
    for lv in reversed(n.levels):
        g, width = lv.w2.shape[0], lv.w1.shape[1]
        total += 2.0 * contexts * (width * g + g * g + lv.experts * g)
        contexts *= lv.fanout
    return total


def _propagate(g: Graph, n) -> float:
    """Every expert's residual ``B (A x)`` once, then the level transform per tree node."""
    slots = _slots(g.node(n.routing))
    total = 0.0
    for l, lv in enumerate(n.levels):
        s, d_next, r = lv.b.shape
        total += 2.0 * s * r * d_next
        if lv.w is not None:
            total += 2.0 * slots[l] * math.prod(lv.w.shape)
    return total
