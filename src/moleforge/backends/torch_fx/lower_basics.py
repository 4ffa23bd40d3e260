"""Emitters of input dropout, expert capacity, the router z-loss, pools of experts with their own
ranks and DoRA magnitudes (``ir/basics_nodes.py``): ``(ctx, node) -> fx node``, registered in
``lower.EMIT`` by ``lower.py``."""

from __future__ import annotations

from torch import fx

from ...ir import Routing, nodes
from ..runtime import ops_basics
from .lower_tree import routing_field

__all__ = ["emit_dropout", "emit_capacity", "emit_z_loss", "emit_ragged", "emit_magnitude"]


def emit_dropout(c, n: nodes.Dropout) -> fx.Node:
    args = (c.env[n.src], n.p, c.training, c.g.get_attr("noise_generator"))
    return c.call(ops_basics.dropout, args, n.id)


def emit_capacity(c, n: nodes.CapacityLimit) -> fx.Node:
    return c.call(ops_basics.capacity_limit, (c.env[n.routing], n.factor), n.id)


def emit_z_loss(c, n: nodes.ZLoss) -> fx.Node:
    return c.call(ops_basics.z_loss, (c.env[n.src], n.weight, c.mask, c.training, c.stat_group), n.id, c.eval_aux)


def emit_ragged(c, n: nodes.RaggedMix) -> fx.Node:
    index = routing_field(c, n.routing, Routing, "index", f"{n.routing}_index") if n.grouped else None
    gates = routing_field(c, n.routing, Routing, "gates", f"{n.routing}_gates")
    args = (c.env[n.src], gates, index, c.expr(n.a), c.expr(n.b), n.ranks, n.scales)
    return c.call(ops_basics.ragged_mix, args, n.id, c.kernels if n.grouped else None)


def emit_magnitude(c, n: nodes.Magnitude) -> fx.Node:
    args = (c.env[n.src], c.env[n.lora], c.expr(n.weight), c.expr(n.a), c.expr(n.b), n.scale, c.expr(n.magnitude))
    return c.call(ops_basics.magnitude, args, n.id)
