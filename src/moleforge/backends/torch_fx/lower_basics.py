"""Emitters of input dropout, expert capacity, the router z-loss and pools of experts with their
own ranks (``ir/basics_nodes.py``), registered in :data:`~.lower.EMIT`."""

from __future__ import annotations

from torch import fx

from ...ir import Routing, nodes
from ..runtime import ops_basics
from .lower import EMIT, _Ctx, _gates
from .lower_tree import routing_field

__all__: list[str] = []


@EMIT.register(nodes.Dropout)
def _dropout(c: _Ctx, n: nodes.Dropout) -> fx.Node:
    args = (c.env[n.src], n.p, c.training, c.g.get_attr("noise_generator"))
    return c.call(ops_basics.dropout, args, n.id)


EMIT.add(lambda c, n: c.call(ops_basics.capacity_limit, (c.env[n.routing], n.factor), n.id), nodes.CapacityLimit)
EMIT.add(lambda c, n: c.call(ops_basics.z_loss, (c.env[n.src], n.weight, c.mask, c.training, c.stat_group), n.id),
         nodes.ZLoss)


@EMIT.register(nodes.RaggedMix)
def _ragged(c: _Ctx, n: nodes.RaggedMix) -> fx.Node:
    index = routing_field(c, n.routing, Routing, "index", f"{n.routing}_index") if c.ir.routing(n.routing).sparse \
        else None
    args = (c.env[n.src], _gates(c, n.routing), index, c.expr(n.a), c.expr(n.b), n.ranks, n.scales)
    return c.call(ops_basics.ragged_mix, args, n.id)
