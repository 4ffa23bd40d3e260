"""Hoist the frozen down projection of an FFN block out of the expert sum.

Identity (linearity of ``W_d``): for the experts' hidden states ``h_i`` and gates ``g_i``,

    Σ_i g_i (h_i W_dᵀ + b_d + s (h_i A_iᵀ) B_iᵀ)
        = (Σ_i g_i h_i) W_dᵀ + (Σ_i g_i) b_d + Σ_i g_i s (h_i A_iᵀ) B_iᵀ,

so the frozen ``d_ff × d_out`` GEMM runs once on the gated sum of hidden states instead of
once per expert, and each expert keeps only its low-rank delta. Exact for any gates when
the down projection has no bias; with a bias it needs ``Σ_i g_i = 1`` (renormalised top-k,
or dense softmax, without an expert capacity that drops slots), and otherwise the node is left
unchanged.

Rewrites ``%y = expert_ffn ...`` into ``%y_hidden = expert_hidden``, ``%y_sum = expert_sum``,
a frozen ``linear`` of the sum, ``expert_lora`` of the hidden states (if the down projection
carries experts) and an ``add`` that keeps the id ``%y``. Idempotent: no ``expert_ffn`` is left.

With dropout (training) the frozen down projection reads the undropped ``h_i`` and the LoRA the
dropped one, so the identity holds with ``h_i`` dropped in the last term only: ``expert_hidden``
draws the gate and up LoRAs' ``ν``, then ``expert_lora`` the down LoRA's, the order ``expert_ffn``
draws them in (nothing between them draws noise).

With DoRA on the down projection (its ``magnitude``) each expert scales its whole output,
``Σ_i g_i c_i ⊙ (h_i W_dᵀ + b_d + ...)``, and ``W_d`` cannot leave the sum: the node is left
unchanged. DoRA on the gate and up projections does not touch the down projection.
"""

from __future__ import annotations

from ..ir import Add, DenseSoftmax, ExpertFFN, ExpertHidden, ExpertLoRA, ExpertSum, Graph, Linear, Route, SoftmaxTopK
from ._rewrite import Ids

__all__ = ["hoist_frozen_down"]


def _gates_sum_to_one(graph: Graph, routing: str) -> bool:
    node = graph.node(routing)
    if not isinstance(node, Route):  # a capacity limit drops slots: its gates need not sum to 1
        return False
    match node.gate:
        case SoftmaxTopK(k=k, renormalize=renorm):
            return renorm or k == graph.routing(routing).experts
        case DenseSoftmax():
            return True
    return False


def _applies(graph: Graph, n) -> bool:
    if not isinstance(n, ExpertFFN) or n.down.magnitude is not None:
        return False
    return n.down.bias is None or _gates_sum_to_one(graph, n.routing)


def _hoisted(n: ExpertFFN, ids: Ids) -> list:
    hidden = ExpertHidden(id=ids.new(f"{n.id}_hidden"), src=n.src, routing=n.routing, up=n.up,
                          gate=n.gate, activation=n.activation, gate_base=n.gate_base, up_base=n.up_base,
                          origin=n.origin, dropout=n.dropout)
    total = ExpertSum(id=ids.new(f"{n.id}_sum"), src=hidden.id, routing=n.routing, origin=n.origin)
    d = n.down
    if d.a is None:
        down = Linear(id=n.id, src=total.id, weight=d.weight, bias=d.bias, origin=f"{n.origin}.down")
        return [hidden, total, down]
    down = Linear(id=ids.new(f"{n.id}_down"), src=total.id, weight=d.weight, bias=d.bias,
                  origin=f"{n.origin}.down.frozen")
    lora = ExpertLoRA(id=ids.new(f"{n.id}_down_lora"), src=hidden.id, routing=n.routing, a=d.a, b=d.b,
                      scale=d.scale, origin=f"{n.origin}.down", dropout=n.dropout)
    return [hidden, total, down, lora, Add(id=n.id, srcs=(down.id, lora.id), origin=f"{n.origin}.down")]


def hoist_frozen_down(graph: Graph) -> Graph:
    """Replace each eligible ``expert_ffn`` by its hoisted form (see the module docstring)."""
    if not any(_applies(graph, n) for n in graph.nodes):
        return graph
    ids = Ids(graph)
    nodes: list = []
    for n in graph.nodes:
        if not _applies(graph, n):
            nodes.append(n)
            continue
        nodes.extend(_hoisted(n, ids))
    return graph.replace(nodes=tuple(nodes))
