"""Emitters of the residual-tree nodes (``TreeRoute``, ``TreeMix``, ``TreePropagate`` and
their aux losses) for ``lower.py``.

When a tree's router down-projection ``x_down = Linear(x)`` and its ``TreeMix`` read the
same input, both projections are emitted as one GEMM (``ops_tree.tree_inputs``): the
rows of ``W_down`` and of every ``A_{l,n}`` stacked, so ``x`` is read once and its
gradient comes from one product instead of two plus a sum; routing and propagation then
run as one block (``ops_tree.tree_block``) that also adds the biases, and
the final projection that alone reads the root hidden folds its bias into its GEMM
(``ops_tree.tree_project``).
"""

from __future__ import annotations

import operator

from torch import fx

from ...ir import Graph, Linear, TreeMix, TreeRoute, TreeRouting, expr_shape
from ..runtime import ops_tree

__all__ = ["emit_tree_route", "emit_tree", "emit_tree_aux", "routing_field"]


def routing_field(c, rid: str, record: type, name: str, label: str) -> fx.Node:
    """Field ``name`` of the routing record (``Routing``, ``TreeRouting``) of node ``rid``, read by
    position, as fast as a tuple."""
    return c.item(c.env[rid], record._fields.index(name), label)


def _fusable_mix(ir: Graph, route: TreeRoute) -> TreeMix | None:
    """The ``TreeMix`` whose down-projections can share one GEMM with the router's
    down-projection: the router reads ``Linear(s)`` (unscaled, read by nothing else) and
    the mix reads ``s``."""
    lin = ir.node(route.src)
    if not isinstance(lin, Linear) or lin.scale != 1.0:
        return None
    if any(lin.id in n.inputs() for n in ir.nodes if n.id != route.id):
        return None
    mixes = (n for n in ir.nodes if isinstance(n, TreeMix) and n.routing == route.id and n.src == lin.src)
    return next(mixes, None)


def emit_tree_route(c, n: TreeRoute) -> fx.Node:
    levels = [(c.expr(lv.keys), c.expr(lv.w1), c.expr(lv.b1), c.expr(lv.w2), c.expr(lv.b2), c.opt(lv.noise))
              for lv in n.levels]
    args = (levels, [lv.fanout for lv in n.levels], n.gate, n.conventions, n.query_activation, n.temperature,
            c.training, c.g.get_attr("noise_generator"))
    mix = _fusable_mix(c.ir, n)
    if mix is None:
        return c.call(ops_tree.tree_route, (c.env[n.src], *args), n.id, {**c.kernels, "cache": c.pack_cache})
    lin = c.ir.node(n.src)
    a_list = [c.expr(lv.a) for lv in mix.levels]
    both = c.call(ops_tree.tree_inputs, (c.env[mix.src], c.expr(lin.weight), a_list), f"{mix.id}_inputs",
                  {"cache": c.pack_cache})
    proj = _projection(c.ir, mix)
    block = c.call(ops_tree.tree_block, (both, expr_shape(lin.weight)[0], c.opt(lin.bias),
                                         [c.opt(lv.a_bias) for lv in mix.levels], args, _levels(c, mix),
                                         mix.activation, mix.position, proj is not None), f"{mix.id}_block",
                   {**c.kernels, "cache": c.pack_cache})
    old = c.env[n.src]
    if not old.users:
        c.g.erase_node(old)
    hidden = c.item(block, 1, mix.id)
    if proj is None:
        c.fused[mix.id] = hidden
    else:
        c.fused[mix.id] = c.call(operator.getitem, (hidden, (slice(None), slice(None, -1))), f"{mix.id}_root")
        args = (hidden, c.expr(proj.weight), c.expr(proj.bias))
        c.fused[proj.id] = c.call(ops_tree.tree_project, args, proj.id)
    return c.item(block, 0, n.id)


def _projection(ir: Graph, mix: TreeMix) -> Linear | None:
    """The biased, unscaled linear that alone reads the tree's root hidden (the final
    projection), emitted with the block as :func:`ops_tree.tree_project`."""
    users = [n for n in ir.nodes if mix.id in n.inputs()]
    if len(users) != 1 or not isinstance(users[0], Linear):
        return None
    return users[0] if users[0].scale == 1.0 and users[0].bias is not None else None


def _levels(c, n) -> list:
    return [(c.expr(lv.b), c.opt(lv.b_bias), c.opt(lv.w), c.opt(lv.w_bias), lv.scale) for lv in n.levels]


def emit_tree(c, n) -> fx.Node:
    if isinstance(n, TreeMix):
        src = c.call(ops_tree.tree_down, (c.env[n.src], [c.expr(lv.a) for lv in n.levels],
                                          [c.opt(lv.a_bias) for lv in n.levels]), f"{n.id}_down")
    else:
        src = c.env[n.src]
    index = routing_field(c, n.routing, TreeRouting, "indices", f"{n.routing}_index")
    weights = routing_field(c, n.routing, TreeRouting, "weights", f"{n.routing}_weights")
    args = (src, index, weights, _levels(c, n), n.activation, n.position)
    return c.call(ops_tree.tree_propagate, args, n.id, c.kernels)


def emit_tree_aux(c, n) -> fx.Node:
    return c.call(ops_tree.tree_aux, (c.env[n.routing], n.kind, n.weight, c.mask, c.training, c.stat_group),
                  n.id, c.eval_aux)
