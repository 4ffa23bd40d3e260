"""Emitters of EPT's nodes (``ir/kronecker_nodes.py``): ``(ctx, node) -> fx node``, registered in
``lower.EMIT`` by ``lower.py``."""

from __future__ import annotations

from torch import fx

from ...ir import Routing, nodes
from ..runtime import ops_kronecker
from .lower_tree import routing_field

__all__ = ["emit_kronecker_mix", "emit_task_embed", "emit_task_scale", "emit_task_contrastive"]


def emit_kronecker_mix(c, n: nodes.KroneckerMix) -> fx.Node:
    gates = routing_field(c, n.routing, Routing, "gates", f"{n.routing}_gates")
    t = c.ir.routing(n.routing)
    fixed_k = t.sparse and not t.variable  # a top-k routing: its index says which experts each token uses
    index = routing_field(c, n.routing, Routing, "index", f"{n.routing}_index") if fixed_k else None
    kernels = tuple(c.expr(k) for k in n.kernels)
    args = (c.env[n.src], gates, index, c.expr(n.a), c.expr(n.b), kernels, n.d_out, n.scale)
    return c.call(ops_kronecker.kronecker_mix, args, n.id)


def emit_task_embed(c, n: nodes.TaskEmbed) -> fx.Node:
    args = (c.env[n.src], c.expr(n.table), c.samples, f"{n.origin or n.id}")
    return c.call(ops_kronecker.task_embed, args, n.id)


def emit_task_scale(c, n: nodes.TaskScale) -> fx.Node:
    return c.call(ops_kronecker.task_scale, (c.env[n.src], n.factors, c.samples, f"{n.origin or n.id}"), n.id)


def emit_task_contrastive(c, n: nodes.TaskContrastive) -> fx.Node:
    args = (c.env[n.src], c.expr(n.table), c.samples, n.weight, n.temperature, c.mask, c.training, c.stat_group,
            f"aux loss {n.origin or n.id}")
    return c.call(ops_kronecker.task_contrastive, args, n.id, c.eval_aux)
