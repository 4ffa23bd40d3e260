"""The verifier's rules of :mod:`.basics_nodes` (input dropout, expert capacity, the router z-loss,
pools of experts with their own ranks, DoRA magnitudes), registered into ``verify.RULES``."""

from __future__ import annotations

from . import nodes
from .graph import Graph

__all__ = ["register", "dora_fields"]


def _dropout(g: Graph, n, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source")
    if not 0.0 <= n.p < 1.0:
        p.append(f"dropout probability {n.p} outside [0, 1)")
    return p


def _capacity(g: Graph, n, need_tensor, need_route, expr) -> list[str]:
    p = need_route(g, n.routing)
    if not p and not g.routing(n.routing).sparse:
        p.append(f"capacity needs a top-k routing; %{n.routing} sends every token to every expert")
    if n.factor <= 0:
        p.append(f"capacity factor {n.factor} is not positive")
    return p


def _z_loss(g: Graph, n, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "router logits")
    if n.id not in g.aux:
        p.append("a z-loss must be listed among the graph's aux losses")
    return p


def _ragged_mix(g: Graph, n, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + need_route(g, n.routing) + expr(g, n.a, "A") + expr(g, n.b, "B")
    if p:
        return p
    E, R = g.routing(n.routing).experts, sum(n.ranks)
    if len(n.ranks) != E or len(n.scales) != E:
        p.append(f"{len(n.ranks)} ranks and {len(n.scales)} scales for a router of {E} experts")
    if n.a.shape != (R, g.width(n.src)):
        p.append(f"A has shape {n.a.shape}, expected (sum of ranks {R}, source width {g.width(n.src)})")
    if len(n.b.shape) != 2 or n.b.shape[1] != R:
        p.append(f"B has shape {n.b.shape}, expected (d_out, sum of ranks {R})")
    if n.grouped and not g.routing(n.routing).sparse:
        p.append("the grouped form needs a sparse (top-k) routing")
    return p


def dora_fields(g: Graph, n, expr) -> list[str]:
    """Problems of a DoRA node's tensors (:class:`~moleforge.ir.basics_nodes._DoRAFields`): its
    parameter expressions, and its ``W`` a frozen input of the graph."""
    p = [x for ref, what in ((n.weight, "W"), (n.a, "A"), (n.b, "B"), (n.magnitude, "magnitude"))
         for x in expr(g, ref, what)]
    if not p and n.weight.name not in {d.name for d in g.frozen}:
        p.append(f"W {n.weight.name!r} must be a frozen input (declared in graph.frozen)")
    return p


def _magnitude(g: Graph, n, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + need_tensor(g, n.lora, "LoRA output") + dora_fields(g, n, expr)
    if p:
        return p
    d_out, d_in = n.weight.shape
    if (g.width(n.src), g.width(n.lora)) != (d_in, d_out):
        p.append(f"reads widths ({g.width(n.src)}, {g.width(n.lora)}), W {n.weight.shape} needs ({d_in}, {d_out})")
    if n.a.shape != (n.b.shape[1], d_in) or n.b.shape[0] != d_out or n.magnitude.shape != (d_out,):
        p.append(f"A {n.a.shape}, B {n.b.shape} and magnitude {n.magnitude.shape} do not fit W {n.weight.shape}")
    return p


def register(rules, need_tensor, need_route, expr) -> None:
    """Add this module's rules to the verifier's ``rules``, with its checks (``verify`` imports this
    module and passes them in)."""
    checks = (need_tensor, need_route, expr)
    rules.add(lambda g, n, f=_dropout: f(g, n, *checks), nodes.Dropout)
    rules.add(lambda g, n, f=_capacity: f(g, n, *checks), nodes.CapacityLimit)
    rules.add(lambda g, n, f=_z_loss: f(g, n, *checks), nodes.ZLoss)
    rules.add(lambda g, n, f=_ragged_mix: f(g, n, *checks), nodes.RaggedMix)
    rules.add(lambda g, n, f=_magnitude: f(g, n, *checks), nodes.Magnitude)
