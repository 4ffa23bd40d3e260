"""The emitter of a routed LoRA pool whose router feeds nothing else (``runtime/ops_routed.py``):
at its softmax top-k route, the router's linear, the route and the grouped pool become one call
of ``routed_grouped_mix``; the pool's node then takes that call's output, added to the frozen
output when the pool is the site's last node.

The planner keeps such routers out of sibling groups when the CPU kernel will run them
(``compiler/planner.py``): the kernel computes the router itself, a shared input GEMM would only
duplicate it.
"""

from __future__ import annotations

from torch import fx

from ...ir import Graph, nodes
from ..runtime import ops_routed

__all__ = ["routed_pool_of", "fuses_router", "emit_routed_pool"]


def routed_pool_of(ir: Graph, route) -> nodes.GroupedMix | None:
    """The grouped pool that ``route`` alone drives, with its router, when the three run as one op:
    a softmax top-k route of an unbiased, unscaled ``Linear`` of the pool's input that nothing
    else reads, and the route read by the pool and aux losses only."""
    if type(route) is not nodes.Route or type(route.gate) is not nodes.SoftmaxTopK:
        return None
    lin = ir.node(route.src)
    if type(lin) is not nodes.Linear or lin.scale != 1.0 or lin.bias is not None:
        return None
    if any(lin.id in n.inputs() for n in ir.nodes if n.id != route.id):
        return None
    readers = [n for n in ir.nodes if route.id in n.inputs() and not isinstance(n, nodes.AuxLoss)]
    if len(readers) != 1 or type(readers[0]) is not nodes.GroupedMix or route.id == ir.output:
        return None
    mix = readers[0]
    return mix if mix.routing == route.id and mix.src == lin.src else None


def fuses_router(ir: Graph) -> bool:
    """Whether a route of ``ir`` runs with its router and pool as one op."""
    return any(routed_pool_of(ir, n) is not None for n in ir.nodes)


def emit_routed_pool(c, n: nodes.Route, mix: nodes.GroupedMix) -> fx.Node:
    """Emit the one call at the route ``n``; the pool ``mix`` gets its output (``c.fused``)."""
    lin = c.ir.node(n.src)
    last = c.ir.node(c.ir.output) is mix
    g = n.gate
    args = (c.env[mix.src], c.expr(lin.weight), c.expr(mix.a), c.expr(mix.b), g.k, g.renormalize, g.temperature,
            mix.scale)
    out = c.call(ops_routed.routed_grouped_mix, args, f"{mix.id}_routed",
                 {**c.kernels, "cache": c.pack_cache, "name": mix.id, "acc": c.acc if last else None})
    old = c.env[n.src]
    if not old.users:
        c.g.erase_node(old)
    c.fused[mix.id] = c.item(out, 0, mix.id)
    return c.item(out, 1, n.id)
