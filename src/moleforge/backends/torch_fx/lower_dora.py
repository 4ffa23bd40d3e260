"""Emitter of DoRA experts (``ir/dora_nodes.py``), registered in ``lower.EMIT`` by ``lower.py``."""

from __future__ import annotations

from torch import fx

from ...ir import Routing, nodes
from ..runtime import ops_dora
from .lower_tree import routing_field

__all__ = ["emit_pool_magnitude"]


def emit_pool_magnitude(c, n: nodes.PoolMagnitude) -> fx.Node:
    gates = routing_field(c, n.routing, Routing, "gates", f"{n.routing}_gates")
    args = (c.env[n.src], gates, c.expr(n.weight), c.expr(n.a), c.expr(n.b), n.scale, c.expr(n.magnitude))
    return c.call(ops_dora.pool_magnitude, args, n.id)
