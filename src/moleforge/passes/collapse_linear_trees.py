"""``collapse_linear_trees``: an S'MoRE residual tree with the identity activation is a flat
gated pool per level (METHODS.md §20.6, the MoMOR form).

Identity. With ``σ = id`` the bottom-up propagation is linear. Let ``ĝ_l (T, s_l)`` be the
path-aggregated gates of pool l (``tree_path_gates``: per expert, the sum over its tree nodes
of the product of the weights from the root down). Then the sum over the level-(l+1) nodes of
their hidden states, each weighted by its path from the root, obeys

    v_1     = Σ_e ĝ_0[e] u_{0,e}
    v_{l+1} = Σ_e ĝ_l[e] u_{l,e} + W_l v_l + (Σ_e ĝ_l[e]) w_l           (l ≥ 1)
    tree    = v_L   (the root's hidden state; the root has path weight 1)

with ``u_{l,e} = c_l (B_{l,e}(A_{l,e} x + a_{l,e}) + b_{l,e})``. Each level is therefore a
block-gated pool whose down-projection carries the A biases, plus gated biases:

    Σ_e ĝ_e u_{l,e} = linear(block_gate(linear(x, rows(A_l), cat(a_l)), ĝ_l, r_l, c_l), cols(B_l))
                      + gate_bias(ĝ_l, b_l, c_l)

Exact for every gate, every convention and any biases (the biases become gated biases: a
constant vector weighted by the token-dependent path gates, not a plain bias). The tree router
and aux losses are kept as they are. Precondition: ``activation == "identity"``; nonlinear trees
are left to ``hoist_tree_down_projections``. Trees whose A biases exist on some levels only
are left unchanged (pure code-size choice; the math does not need it).
"""

from __future__ import annotations

from dataclasses import replace

from ..ir import (
    Add,
    BlockColumns,
    BlockGate,
    BlockRows,
    Concat,
    GateBias,
    Linear,
    Pick,
    TreeMix,
    TreePathGates,
)
from ._rewrite import rewrite_nodes

__all__ = ["collapse_linear_trees", "flat_bias"]


def flat_bias(bias) -> Concat:
    """``(s, r) -> (s·r,)`` as a parameter expression: the experts' biases end to end."""
    return Concat(tuple(Pick(bias, i) for i in range(bias.shape[0])), 0)


def _level(n: TreeMix, l: int, prev: str | None, ids) -> list:
    """Nodes computing ``v_{l+1}``; the last one is the level's sum."""
    lv = n.levels[l]
    s, _, r = lv.b.shape
    tag = f"{n.id}{l}"
    gates = TreePathGates(id=ids.new(f"{tag}_gates"), routing=n.routing, level=l, origin=n.origin)
    bias = flat_bias(lv.a_bias) if lv.a_bias is not None else None
    down = Linear(id=ids.new(f"{tag}_down"), src=n.src, weight=BlockRows(lv.a), bias=bias, origin=n.origin)
    gated = BlockGate(id=ids.new(f"{tag}_gated"), src=down.id, routing=gates.id, rank=r, scale=lv.scale,
                      origin=n.origin)
    up = Linear(id=ids.new(f"{tag}_up"), src=gated.id, weight=BlockColumns(lv.b), origin=n.origin)
    nodes: list = [gates, down, gated, up]
    if lv.b_bias is not None:
        nodes.append(GateBias(id=ids.new(f"{tag}_bbias"), routing=gates.id, bias=lv.b_bias, scale=lv.scale,
                              origin=n.origin))
    if prev is not None:
        nodes.append(Linear(id=ids.new(f"{tag}_carry"), src=prev, weight=lv.w, origin=n.origin))
        if lv.w_bias is not None:
            nodes.append(GateBias(id=ids.new(f"{tag}_wbias"), routing=gates.id, bias=lv.w_bias, origin=n.origin))
    terms = [m.id for m in nodes[3:]]
    if len(terms) > 1:
        nodes.append(Add(id=ids.new(f"{tag}_sum"), srcs=tuple(terms), origin=n.origin))
    return nodes


def _collapse(n, graph, ids):
    if not isinstance(n, TreeMix) or n.activation != "identity" or n.position != "all":
        return None
    if len({lv.a_bias is None for lv in n.levels}) > 1:
        return None
    out: list = []
    prev = None
    for l in range(len(n.levels)):
        out += _level(n, l, prev, ids)
        prev = out[-1].id
    return out[:-1] + [replace(out[-1], id=n.id)]


def collapse_linear_trees(graph):
    """Rewrite every identity-activation :class:`TreeMix` into per-level gated pools."""
    return rewrite_nodes(graph, _collapse)
