"""``hoist_tree_down_projections``: compute the down-projections of every expert of every pool
of a residual tree with one GEMM, then propagate (METHODS.md §20.7).

Identity. ``A_{l,n} x + a_{l,n}`` depends on x only, not on the tree, so for all pools at once

    [A_{0,1}x + a_{0,1}, …, A_{0,s_0}x + a_{0,s_0}, A_{1,1}x + …]
        = linear(x, cat(rows(A_0), rows(A_1), …), cat(a_0, a_1, …))          (T, Σ_l s_l r_l)

which is exactly the (pool-major, expert-major) source ``tree_propagate`` reads, so

    tree_mix(x, route, levels, σ) = tree_propagate(linear(x, A_all, a_all), route, levels, σ)

The GEMM has the size of a rank-``Σ s_l r_l`` LoRA's down-projection; everything after it is
per-token work on tiny tensors, and a tree node duplicated by the routing costs nothing
extra. Exact for every activation and gate. Precondition: every level has an A bias or none
does (else the tree is left unchanged). ``fuse_shared_input_linears`` then appends the
router's down-projection to the same GEMM.
"""

from __future__ import annotations

from ..ir import BlockRows, Linear, TreeMix, TreePropagate
from ._rewrite import rewrite_nodes
from .collapse_linear_trees import flat_bias
from .fuse_shared_input_linears import flat_concat

__all__ = ["hoist_tree_down_projections"]


def _hoist(n, graph, ids):
    if not isinstance(n, TreeMix):
        return None
    biases = [lv.a_bias for lv in n.levels]
    if len({b is None for b in biases}) > 1:
        return None
    weight = flat_concat([BlockRows(lv.a) for lv in n.levels])
    bias = None if biases[0] is None else flat_concat([flat_bias(b) for b in biases])
    down = Linear(id=ids.new(f"{n.id}_down"), src=n.src, weight=weight, bias=bias, origin=n.origin)
    return (down, TreePropagate(id=n.id, src=down.id, routing=n.routing, levels=n.levels,
                                activation=n.activation, position=n.position, origin=n.origin))


def hoist_tree_down_projections(graph):
    """Replace every :class:`TreeMix` by one down-projection GEMM and a :class:`TreePropagate`."""
    return rewrite_nodes(graph, _hoist)
