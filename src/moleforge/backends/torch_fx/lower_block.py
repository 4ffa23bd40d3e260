"""Emitters of the FFN-block expert nodes (``ir/block_nodes.py``): ``(ctx, node) -> fx node``,
registered in ``lower.EMIT`` by ``lower.py``. Hidden states with shared frozen projections read
by one sum (and at most one down-LoRA) lower to one fused op, ``routed_ffn``."""

from __future__ import annotations

from torch import fx

from ...ir import ExpertLinear, Graph, Routing, nodes
from ..runtime import ops_block
from .lower_tree import routing_field

__all__ = ["emit_expert_block", "emit_expert_sum", "emit_expert_lora", "runs_as_routed_ffn"]


def _plan(c, rid: str) -> fx.Node:
    """The routing's slots sorted by expert, computed once per router."""
    if rid not in c.plans:
        gates = routing_field(c, rid, Routing, "gates", f"{rid}_gates")
        index = routing_field(c, rid, Routing, "index", f"{rid}_index")
        c.plans[rid] = c.call(ops_block.slot_plan, (gates, index), f"{rid}_slots")
    return c.plans[rid]


def _expert_linear(c, lin: ExpertLinear | None):
    if lin is None:
        return None
    return (c.expr(lin.weight), c.opt(lin.bias), c.opt(lin.a), c.opt(lin.b), lin.scale)


def _drop(c, n) -> dict[str, tuple]:
    """The ``drop`` argument of a block op with dropout, ``(p, training, noise generator)``; none
    without (the op then runs as it always did)."""
    return {"drop": (n.dropout, c.training, c.g.get_attr("noise_generator"))} if n.dropout else {}


def _magnitudes(n) -> list:
    """The DoRA magnitudes of block node ``n``'s up, gate and down linears (``None`` where absent)."""
    return [None if lin is None else lin.magnitude for lin in (n.up, n.gate, getattr(n, "down", None))]


def _dora(c, n) -> dict[str, tuple]:
    """The ``dora`` argument of a block op with DoRA experts (``ops_block_dora``), with the module's
    cache of their norms; none without."""
    mags = _magnitudes(n)
    if all(m is None for m in mags):
        return {}
    return {"dora": tuple(c.opt(m) for m in mags), "cache": c.pack_cache}


def emit_expert_block(c, n) -> fx.Node:
    if runs_as_routed_ffn(c.ir, n):
        return _routed_ffn(c, n)
    base = tuple(None if b is None else c.env[b] for b in (n.up_base, n.gate_base))
    head = (c.env[n.src], _plan(c, n.routing), _expert_linear(c, n.up), _expert_linear(c, n.gate))
    kwargs = {**_drop(c, n), **_dora(c, n)} or None
    if isinstance(n, nodes.ExpertFFN):
        down = (_expert_linear(c, n.down),)
        return c.call(ops_block.expert_ffn, head + down + base + (n.activation,), n.id, kwargs)
    return c.call(ops_block.expert_hidden, head + base + (n.activation,), n.id, kwargs)


def runs_as_routed_ffn(graph: Graph, n) -> bool:
    """Whether FFN-block node ``n`` lowers to one fused op (``routed_ffn``): hidden states with
    shared frozen projections, read by one ``expert_sum`` and at most one ``expert_lora`` of the
    same routing; not with DoRA experts (a magnitude on a linear), which run the torch ops."""
    if not isinstance(n, nodes.ExpertHidden) or any(m is not None for m in _magnitudes(n)):
        return False
    users = graph.users(n.id)
    sums = [u for u in users if isinstance(u, nodes.ExpertSum) and u.routing == n.routing]
    loras = [u for u in users if isinstance(u, nodes.ExpertLoRA) and u.routing == n.routing]
    shared = n.up_base is not None and (n.gate is None or n.gate_base is not None)
    same_dropout = all(u.dropout == n.dropout for u in loras)
    return shared and same_dropout and len(sums) == 1 and len(loras) <= 1 and len(users) == len(sums) + len(loras)


def _routed_ffn(c, n: nodes.ExpertHidden) -> fx.Node:
    users = c.ir.users(n.id)
    total = next(u for u in users if isinstance(u, nodes.ExpertSum))
    lora = next((u for u in users if isinstance(u, nodes.ExpertLoRA)), None)
    base = tuple(None if b is None else c.env[b] for b in (n.up_base, n.gate_base))
    args = (c.env[n.src], _plan(c, n.routing), _expert_linear(c, n.up), _expert_linear(c, n.gate)) + base
    down = (None, None, 1.0) if lora is None else (c.expr(lora.a), c.expr(lora.b), lora.scale)
    out = c.call(ops_block.routed_ffn, args + (n.activation, *down), n.id,
                 {**c.kernels, "cache": c.pack_cache, **_drop(c, n)})
    c.fused[total.id] = c.item(out, 0, total.id)
    if lora is not None:
        c.fused[lora.id] = c.item(out, 1, lora.id)
    return out


def emit_expert_sum(c, n: nodes.ExpertSum) -> fx.Node:
    if n.id in c.fused:
        return c.fused[n.id]
    return c.call(ops_block.expert_sum, (c.env[n.src], _plan(c, n.routing)), n.id)


def emit_expert_lora(c, n: nodes.ExpertLoRA) -> fx.Node:
    if n.id in c.fused:
        return c.fused[n.id]
    plan = _plan(c, n.routing)
    z = c.call(ops_block.expert_lora_down, (c.env[n.src], plan, c.expr(n.a)), f"{n.id}_z", _drop(c, n) or None)
    return c.call(ops_block.expert_lora_up, (z, plan, c.expr(n.b), n.scale), n.id)
