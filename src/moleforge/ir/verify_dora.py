"""The verifier's rule of :class:`~moleforge.ir.dora_nodes.PoolMagnitude`, registered in
``verify.RULES`` by ``verify.py`` (:func:`register`), which gives them its checks of operands and
parameter expressions."""

from __future__ import annotations

from .dora_nodes import PoolMagnitude
from .graph import Graph
from .verify_basics import dora_fields

__all__ = ["register"]


def _pool_magnitude(g: Graph, n: PoolMagnitude, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + need_route(g, n.routing) + dora_fields(g, n, expr)
    if p:
        return p
    (d_out, d_in), E = n.weight.shape, g.routing(n.routing).experts
    if g.width(n.src) != d_in:
        p.append(f"reads width {g.width(n.src)}, W {n.weight.shape} needs {d_in}")
    if (len(n.a.shape), len(n.b.shape)) != (3, 3) or n.a.shape[0] not in (1, E) or n.a.shape[2] != d_in \
            or n.b.shape[0] not in (1, E) or n.b.shape[1:] != (d_out, n.a.shape[1]) \
            or n.magnitude.shape != (E, d_out):
        p.append(f"A {n.a.shape}, B {n.b.shape} and magnitude {n.magnitude.shape} do not fit {E} experts "
                 f"on W {n.weight.shape}")
    return p


def register(rules, need_tensor, need_route, expr) -> None:
    """Add this module's rules to the verifier's ``rules``, with its checks."""
    checks = (need_tensor, need_route, expr)
    rules.add(lambda g, n, f=_pool_magnitude: f(g, n, *checks), PoolMagnitude)
