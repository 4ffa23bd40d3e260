"""Matrix-multiply FLOPs per token of an adapter graph, read off the IR shapes.

Counts 2 FLOPs per multiply-add of every GEMM a node performs for one token, the way the
node is defined (a ``PoolMix`` runs every expert; a ``GroupedMix`` only the ``k`` selected;
a ``TreeMix`` computes every expert's residual once and applies the level transform
``W_l`` at every tree node). Element-wise work (gates, activations, softmax, adds) is not
counted; it is small next to the GEMMs.
"""

from __future__ import annotations

import math

from ..ir import (
    AbsTopK,
    Add,
    AuxLoss,
    BlockGate,
    Columns,
    DenseSoftmax,
    ExpertFFN,
    ExpertHidden,
    ExpertLinear,
    ExpertLoRA,
    ExpertSum,
    GateBias,
    Graph,
    GroupedMix,
    Input,
    Jitter,
    Linear,
    Node,
    OuterGate,
    PoolMix,
    Route,
    SiblingLinear,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TreeMix,
    TreePathGates,
    TreePropagate,
    TreeRoute,
    expr_shape,
)

__all__ = ["flops_per_token", "node_flops", "base_flops_per_token"]


def base_flops_per_token(graph: Graph) -> int:
    """FLOPs of the frozen linear the graph adapts: ``2 · d_in · d_out``."""
    return 2 * graph.d_in * graph.d_out


def flops_per_token(graph: Graph) -> int:
    """Sum of :func:`node_flops` over the graph."""
    return sum(node_flops(graph, n) for n in graph.nodes)


def _active(graph: Graph, routing: str) -> int:
    """Experts a flat router activates per token."""
    node = graph.node(routing)
    assert isinstance(node, Route), f"%{routing} is not a flat router"
    match node.gate:
        case SoftmaxTopK(k=k) | SigmoidTopK(k=k) | AbsTopK(k=k):
            return k
        case DenseSoftmax() | StaticGate():
            return node.experts
    raise TypeError(node.gate)


def _pool(graph: Graph, n: PoolMix | GroupedMix) -> int:
    """``a (E_a, r, d_in)``, ``b (E_b, d_out, r)``: one down and one up GEMM per computed expert."""
    _, r, d_in = expr_shape(n.a)
    _, d_out, _ = expr_shape(n.b)
    experts = graph.width(n.routing) if isinstance(n, PoolMix) else _active(graph, n.routing)
    return experts * 2 * r * (d_in + d_out)


def _tree_route(n: TreeRoute) -> int:
    """Per pool l, every context (``Π_{j>l} f_j`` of them) runs the query MLP and scores s_l keys."""
    total, contexts = 0, 1
    for lv in reversed(n.levels):
        g, in_l = lv.w1.shape
        total += contexts * 2 * (g * in_l + g * g + g * lv.experts)
        contexts *= lv.fanout
    return total


def _tree(graph: Graph, n: TreeMix | TreePropagate) -> int:
    """Every expert's up-projection once (and down-projection, for ``TreeMix``), plus ``W_l``
    at each of the ``F_l`` tree nodes of pool l > 0."""
    route = graph.node(n.routing)
    assert isinstance(route, TreeRoute), f"%{n.routing} is not a tree router"
    fanouts = [lv.fanout for lv in route.levels]
    total = 0
    for l, lv in enumerate(n.levels):
        s, d_next, r = lv.b.shape
        total += 2 * s * r * d_next
        if isinstance(n, TreeMix):
            total += 2 * s * r * lv.a.shape[2]
        if lv.w is not None:
            nodes = math.prod(fanouts[l:])
            total += nodes * 2 * lv.w.shape[0] * lv.w.shape[1]
    return total


def _expert_linear(lin: ExpertLinear, hoisted: bool) -> int:
    """One expert's pass through an FFN-block linear: the frozen GEMM unless it was computed
    once for all experts (``hoisted``), plus the expert's LoRA."""
    out, d_in = lin.weight.shape
    base = 0 if hoisted else 2 * out * d_in
    lora = 0 if lin.a is None else 2 * lin.a.shape[1] * (d_in + out)
    return base + lora


def _block(graph: Graph, n: ExpertFFN | ExpertHidden) -> int:
    """Active experts each run their LoRAs (and the frozen GEMMs not hoisted out of the experts)."""
    per = _expert_linear(n.up, n.up_base is not None)
    if n.gate is not None:
        per += _expert_linear(n.gate, n.gate_base is not None)
    if isinstance(n, ExpertFFN):
        per += _expert_linear(n.down, False)
    return _active(graph, n.routing) * per


def node_flops(graph: Graph, n: Node) -> int:
    """Matmul FLOPs one token spends in node ``n``."""
    match n:
        case Linear(weight=w) | SiblingLinear(weight=w):
            return 2 * math.prod(expr_shape(w))
        case PoolMix() | GroupedMix():
            return _pool(graph, n)
        case TreeRoute():
            return _tree_route(n)
        case TreeMix() | TreePropagate():
            return _tree(graph, n)
        case ExpertFFN() | ExpertHidden():
            return _block(graph, n)
        case ExpertLoRA(a=a, b=b):
            return _active(graph, n.routing) * 2 * a.shape[1] * (a.shape[2] + b.shape[1])
        case ExpertSum() | GateBias() | TreePathGates():
            return 0
        case Input() | Columns() | Add() | Jitter() | Route() | BlockGate() | OuterGate() | AuxLoss():
            return 0
    raise TypeError(f"no FLOP count for node kind {type(n).__name__}")
