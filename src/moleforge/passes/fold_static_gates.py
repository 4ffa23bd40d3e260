"""``fold_static_gates``: gates that do not depend on the input are folded into the experts.

Identity. A flat router over ``E = 1`` expert gives ``g ≡ 1`` whatever its scores, for every
gate kind that reads scores: ``softmax`` of one score is 1 (renormalised or not, any
temperature), sigmoid top-1 gives ``k·u/u = 1``, the FlyLoRA mask of the only expert is 1.
(A static gate is ``g ≡ w``, its stored weight, not 1: it is not folded.) Then

    pool_mix(x, g, A, B, s)    = s · (x A[0]ᵀ) B[0]ᵀ      -> linear(linear(x, A[0]), B[0], scale=s)
    grouped_mix(x, g, A, B, s) = the same
    block_gate(h, g, r, s)     = s · h                      (the scale moves into the next linear
    outer_gate(h, g, s)        = s · h                       when that is a plain linear of h)

so the site becomes a plain LoRA chain: the form an inference export merges into the frozen
weight (``ΔW = s·B A``), and training skips the router entirely. The router nodes die unless
an aux loss still reads them (its value is unchanged: it reads the routing, not the mix).

Exact whenever the gate is defined (the sigmoid gate divides by ``u``, which is 0 only if the
balancing bias cancels ``σ(z)`` exactly). Pre/postconditions: a verified graph in, a verified
graph out; graphs without one-expert routers are returned unchanged (same object).
"""

from __future__ import annotations

from ..ir import BlockGate, GroupedMix, Linear, OuterGate, Pick, PoolMix, Route
from ._rewrite import rewrite_nodes

__all__ = ["fold_static_gates"]


def _static(graph, rid: str) -> bool:
    """A one-expert router whose gate is the constant 1 (an input-independent gate is its
    weights ``w``, not 1)."""
    node = graph.node(rid)
    return isinstance(node, Route) and node.experts == 1 and not node.input_independent


def _fold(n, graph, ids):
    match n:
        case PoolMix() | GroupedMix() if _static(graph, n.routing):
            h = Linear(id=ids.new(f"{n.id}_down"), src=n.src, weight=Pick(n.a, 0), origin=n.origin)
            return (h, Linear(id=n.id, src=h.id, weight=Pick(n.b, 0), scale=n.scale, origin=n.origin))
        case BlockGate() | OuterGate() if _static(graph, n.routing) and _scalable_consumer(graph, n.id):
            return ()
        case Linear() if (gate := _folded_gate(graph, n.src)) is not None:
            return (Linear(id=n.id, src=gate.src, weight=n.weight, bias=n.bias, scale=n.scale * gate.scale,
                           origin=n.origin),)
    return None


def _scalable_consumer(graph, nid: str) -> bool:
    """The gate can disappear when its only reader is a bias-free linear (which takes the scale)."""
    users = graph.users(nid)
    return (len(users) == 1 and isinstance(users[0], Linear) and users[0].bias is None
            and nid not in (graph.output, *graph.aux))


def _folded_gate(graph, nid: str):
    node = graph.node(nid)
    if isinstance(node, (BlockGate, OuterGate)) and _static(graph, node.routing) and _scalable_consumer(graph, nid):
        return node
    return None


def fold_static_gates(graph):
    """Fold every input-independent (one-expert) gate; see the module docstring."""
    return rewrite_nodes(graph, _fold)
