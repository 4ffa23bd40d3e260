"""FLOPs per token of a site's IR graph, read off the node kinds and parameter shapes: the one
count behind ``moleforge.explain`` / ``handle.explain()`` and ``moleforge inspect``.

What is counted: one token's forward pass (evaluation mode), 2 FLOPs per multiply-add of every
matrix product with a weight matrix that a node performs, as the node is defined in
:mod:`moleforge.ir.nodes`, so that a graph before and after the passes is priced by the kernels
it names:

- ``Linear`` / ``SiblingLinear``: ``2·in·out`` (a sibling counts its own columns of the shared
  GEMM);
- ``PoolMix``: every one of the E experts, ``2·E·r·(d_in + d_out)``; ``GroupedMix``: only the
  k selected, ``2·k·r·(d_in + d_out)`` (a dense router activates all E; a variable one, DynMoLE's
  top-p, from k to E: counted at E, the most a token can use);
- ``TreeRoute``: per pool l, every context (``Π_{j>l} f_j``) runs the query MLP and scores the
  pool's ``s_l`` keys, ``2·(g·in_l + g·g + s_l·g)`` each;
- ``TreeMix``: every expert's residual once, ``2·s_l·r_l·(d_in + d_{l+1})`` per pool, plus the
  level transform ``W_l`` at each of the ``F_l = Π_{j≥l} f_j`` tree nodes drawn from pool l > 0,
  ``2·F_l·d_l·d_{l+1}``; ``TreePropagate`` the same without the down-projections (their GEMM is
  a ``Linear`` of the graph);
- ``GateBias`` with per-expert biases ``(E, d)``: the product ``g @ bias``, ``2·E·d``;
- ``RaggedMix`` (experts of their own ranks): every rank, ``2·Σ r_i·(d_in + d_out)``; the
  grouped form the selected experts', bounded by the k largest ranks,
  ``2·Σ_{k largest} r_i·(d_in + d_out)`` (the count; what runs depends on the routing);
- ``KroneckerMix`` (EPT): per kernel size, ``Z X`` and the per-token merged kernel (see its rule);
  ``PoolMagnitude`` (DoRA experts): ``x Wᵀ`` once and every expert's LoRA;
- FFN-block experts (``ExpertFFN`` / ``ExpertHidden`` / ``ExpertLoRA``): per active expert, its
  LoRAs and the block's frozen GEMMs not computed once outside the experts.

An FFN-block graph replaces the block, so its count includes the block's frozen GEMMs;
:func:`frozen_flops_per_token` is that part (the ``Linear`` nodes on frozen inputs, and the
frozen GEMMs each expert repeats), and :func:`adapter_flops_per_token` the rest: the router and
the experts' LoRAs, what the adapter itself adds.

Not counted: element-wise work (the gate products of ``BlockGate`` / ``OuterGate``, the gated
sums of pools, trees and ``ExpertSum``, activations, bias adds, ``Add``), routing softmaxes and
top-k, aux losses, and training-only noise (``Jitter``, the noisy tree gate's projection). This is
what ``torch.utils.flop_counter`` counts when the lowered site runs, except that the runtime
computes tree routers and tree levels in other (algebraically equal) ways.
"""

from __future__ import annotations

import math
from typing import Callable

from ..ir import ExpertLinear, Graph, Node, ParamRef, Rules, expr_shape, nodes

__all__ = ["flops_per_token", "node_flops", "base_flops_per_token", "frozen_flops_per_token",
           "adapter_flops_per_token", "FLOPS", "kronecker_group_flops"]

FLOPS: Rules[Callable[[Graph, Node], int]] = Rules("the FLOP counter", nodes.NODE_KINDS)
"""Node kind -> ``(graph, node) -> forward FLOPs per token``."""


def flops_per_token(graph: Graph) -> int:
    """Forward FLOPs one token spends in ``graph`` (the sum of :func:`node_flops`). For a linear
    site this is the adapter alone (the frozen linear runs beside it); for an FFN-block site the
    graph replaces the block, so its frozen GEMMs are included."""
    return sum(node_flops(graph, n) for n in graph.nodes)


def base_flops_per_token(graph: Graph) -> int:
    """Forward FLOPs per token of the frozen module the graph adapts: ``2·d_in·d_out`` for a
    linear; for an FFN block, ``2·out·in`` summed over the block's frozen weight matrices."""
    weights = [p.shape for p in graph.frozen if len(p.shape) == 2]
    if weights:
        return sum(2 * math.prod(shape) for shape in weights)
    return 2 * graph.d_in * graph.d_out


def frozen_flops_per_token(graph: Graph) -> int:
    """Of :func:`flops_per_token`, the FLOPs spent on the frozen weights the graph reads
    (``graph.frozen``): 0 for a linear site; for an FFN-block site the block's GEMMs, once each
    where the rewrites share or hoist them, once per active expert where they do not."""
    frozen = {p.name for p in graph.frozen}
    total = 0
    for n in graph.nodes:
        match n:
            case nodes.Linear(weight=ParamRef(name=name)) if name in frozen:
                total += node_flops(graph, n)
            case nodes.ExpertFFN() | nodes.ExpertHidden():
                total += _block(graph, n)[0]
            case nodes.Magnitude():  # DoRA's x Wᵀ
                total += node_flops(graph, n)
    return total


def adapter_flops_per_token(graph: Graph) -> int:
    """Of :func:`flops_per_token`, the FLOPs of the adapter itself (routers, LoRAs, experts):
    all of them for a linear site, all but :func:`frozen_flops_per_token` for an FFN block."""
    return flops_per_token(graph) - frozen_flops_per_token(graph)


def node_flops(graph: Graph, n: Node) -> int:
    """Forward FLOPs one token spends in node ``n`` of ``graph`` (see the module docstring)."""
    return FLOPS[n](graph, n)


FLOPS.add(lambda graph, n: 2 * math.prod(expr_shape(n.weight)), nodes.Linear, nodes.SiblingLinear)
FLOPS.add(lambda graph, n: 0, nodes.BlockGate, nodes.OuterGate, nodes.ExpertSum, nodes.TreePathGates,
          nodes.Input, nodes.Columns, nodes.Add, nodes.Jitter, nodes.Route, nodes.AuxLoss, nodes.TaskScores,
          nodes.LayerScalings)
FLOPS.add(lambda graph, n: _tree_route(n), nodes.TreeRoute)
FLOPS.add(lambda graph, n: sum(_block(graph, n)), nodes.ExpertFFN, nodes.ExpertHidden)


@FLOPS.register(nodes.CoreExperts)
def _core_experts(graph: Graph, n: nodes.CoreExperts) -> int:
    """Every expert's full up-projection ``B M_i``: ``2·E·(r·r + r·d_out)``."""
    E, r, _ = expr_shape(n.cores)
    return E * 2 * (r * r + r * expr_shape(n.b)[0])


FLOPS.add(lambda graph, n: 2 * math.prod(expr_shape(n.cores)), nodes.CoreMerge)  # every core once: 2·E·r²


@FLOPS.register(nodes.GateBias)
def _gate_bias(graph: Graph, n: nodes.GateBias) -> int:
    shape = expr_shape(n.bias)
    return 2 * math.prod(shape) if len(shape) == 2 else 0


@FLOPS.register(nodes.ExpertLoRA)
def _expert_lora(graph: Graph, n: nodes.ExpertLoRA) -> int:
    _, r, d_hidden = n.a.shape
    return _active(graph, n.routing) * 2 * r * (d_hidden + n.b.shape[1])


def _active(graph: Graph, routing: str) -> int:
    """Experts a flat router activates per token: k for a top-k gate, all E otherwise (and for a
    variable gate, whose tokens use from k to E: the count is an upper bound)."""
    t = graph.routing(routing)
    return t.k if t.k is not None and not t.variable else t.experts


@FLOPS.register(nodes.PoolMix, nodes.GroupedMix)
def _pool(graph: Graph, n: nodes.PoolMix | nodes.GroupedMix) -> int:
    """``a (E_a, r, d_in)``, ``b (E_b, d_out, r)``: one down and one up GEMM per computed expert
    (every expert for ``PoolMix``, the active ones for ``GroupedMix``)."""
    _, r, d_in = expr_shape(n.a)
    _, d_out, _ = expr_shape(n.b)
    experts = graph.routing(n.routing).experts if isinstance(n, nodes.PoolMix) else _active(graph, n.routing)
    return experts * 2 * r * (d_in + d_out)


def _tree_route(n: nodes.TreeRoute) -> int:
    """Per pool l, every context (``Π_{j>l} f_j`` of them) runs the query MLP
    ``w1 (g, in_l)``, ``w2 (g, g)`` and scores the pool's ``s_l`` keys ``(s_l, g)``."""
    total, contexts = 0, 1
    for lv in reversed(n.levels):
        g, in_l = lv.w1.shape
        total += contexts * 2 * (g * in_l + g * g + g * lv.experts)
        contexts *= lv.fanout
    return total


@FLOPS.register(nodes.TreeMix, nodes.TreePropagate)
def _tree(graph: Graph, n: nodes.TreeMix | nodes.TreePropagate) -> int:
    """Every expert's up-projection once (and down-projection, for ``TreeMix``), plus ``W_l``
    at each of the ``F_l`` tree nodes of pool l > 0."""
    fanouts = graph.tree_routing(n.routing).fanouts
    total = 0
    for l, lv in enumerate(n.levels):
        s, d_next, r = lv.b.shape
        total += 2 * s * r * d_next
        if isinstance(n, nodes.TreeMix):
            total += 2 * s * r * lv.a.shape[2]
        if lv.w is not None:
            total += math.prod(fanouts[l:]) * 2 * lv.w.shape[0] * lv.w.shape[1]
    return total


def _expert_linear(lin: ExpertLinear, hoisted: bool) -> tuple[int, int]:
    """One expert's pass through an FFN-block linear, ``(frozen, LoRA)``: the frozen GEMM unless
    it was computed once for all experts (``hoisted``), and the expert's LoRA."""
    out, d_in = lin.weight.shape
    base = 0 if hoisted else 2 * out * d_in
    lora = 0 if lin.a is None else 2 * lin.a.shape[1] * (d_in + out)
    return base, lora


def _block(graph: Graph, n: nodes.ExpertFFN | nodes.ExpertHidden) -> tuple[int, int]:
    """``(frozen, LoRA)``: active experts each run their LoRAs and the frozen GEMMs not hoisted
    out of the experts."""
    parts = [_expert_linear(n.up, n.up_base is not None)]
    if n.gate is not None:
        parts.append(_expert_linear(n.gate, n.gate_base is not None))
    if isinstance(n, nodes.ExpertFFN):
        parts.append(_expert_linear(n.down, False))
    active = _active(graph, n.routing)
    return active * sum(p[0] for p in parts), active * sum(p[1] for p in parts)


# ---- input dropout, capacity, z-loss, ragged pools (basics_nodes) -------------------------

FLOPS.add(lambda graph, n: 0, nodes.Dropout, nodes.CapacityLimit, nodes.ZLoss)


@FLOPS.register(nodes.RaggedMix)
def _ragged(graph: Graph, n: nodes.RaggedMix) -> int:
    """Every rank; grouped: the k largest ranks (an upper bound)."""
    d_in, d_out = n.a.shape[1], n.b.shape[0]
    k = graph.routing(n.routing).k
    ranks = sorted(n.ranks, reverse=True)[:k] if n.grouped and k is not None else n.ranks
    return 2 * sum(ranks) * (d_in + d_out)
FLOPS.add(lambda graph, n: 2 * n.weight.shape[0] * n.weight.shape[1], nodes.Magnitude)  # x Wᵀ; the norm is per forward


# ---- EPT (kronecker_nodes) -----------------------------------------------------------------

FLOPS.add(lambda graph, n: 0, nodes.TaskEmbed, nodes.TaskScale, nodes.TaskContrastive)


@FLOPS.register(nodes.PoolMagnitude)
def _pool_magnitude(graph: Graph, n: nodes.PoolMagnitude) -> int:
    """DoRA experts: ``x Wᵀ`` once and every expert's LoRA, ``2·(d_in·d_out + E·r·(d_in + d_out))``
    (the norms are per forward, not per token)."""
    (d_out, d_in), r, E = n.weight.shape, n.a.shape[1], graph.routing(n.routing).experts
    return 2 * (d_in * d_out + E * r * (d_in + d_out))


@FLOPS.register(nodes.KroneckerMix)
def _kronecker(graph: Graph, n: nodes.KroneckerMix) -> int:
    """Per kernel size s (its ``E_s`` experts share ``Z``): ``Z X`` by the meta-seed's two GEMMs, the
    per-token merged kernel and its product, ``2·(R·(d_in' + d_out') + E_s·s² + d_out'·s)`` with the
    widths padded to multiples of s (``d' = ⌈d/s⌉·s``); every size under a dense router, the k
    costliest under a top-k one (an upper bound)."""
    k = graph.routing(n.routing).k
    costs = sorted(kronecker_group_flops(graph.width(n.src), n.d_out, n.a.shape[0], n.sizes()), reverse=True)
    return sum(costs[:k] if k is not None else costs)


def kronecker_group_flops(d_in: int, d_out: int, R: int, sizes: tuple[int, ...]) -> list[int]:
    """FLOPs per token of each kernel size's group of Kronecker experts, on widths padded to its size."""
    costs = []
    for s in dict.fromkeys(sizes):
        d_in_s, d_out_s = -(-d_in // s) * s, -(-d_out // s) * s  # the padded token, the uncut output
        costs.append(2 * (R * (d_in_s + d_out_s) + sizes.count(s) * s * s + d_out_s * s))
    return costs


FLOPS.add(lambda graph, n: 0, nodes.Preserve)  # reads no token
