"""The verifier's rules of EPT's nodes (:mod:`.kronecker_nodes`), registered in ``verify.RULES`` by
``verify.py`` (:func:`register`), which gives them its checks of operands and parameter expressions."""

from __future__ import annotations

from .graph import Graph
from .kronecker_nodes import KroneckerMix, TaskContrastive, TaskEmbed, TaskScale

__all__ = ["register"]


def _kronecker_mix(g: Graph, n: KroneckerMix, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + need_route(g, n.routing) + expr(g, n.a, "A") + expr(g, n.b, "B")
    p += [x for i, k in enumerate(n.kernels) for x in expr(g, k, f"K{i}")]
    if p:
        return p
    E, d_in = g.routing(n.routing).experts, g.width(n.src)
    if len(n.kernels) != E:
        p.append(f"{len(n.kernels)} kernels for a router of {E} experts")
    (R, W), (H, R2) = n.a.shape, n.b.shape
    if R != R2:
        p.append(f"A {n.a.shape} and B {n.b.shape} disagree on the meta-seed rank")
    for i, k in enumerate(n.kernels):
        s = k.shape[0]
        if k.shape != (s, s):
            p.append(f"K{i} has shape {k.shape}, expected a square kernel")
        elif -(-d_in // s) > W or -(-n.d_out // s) > H:  # a kernel need not divide a width: it is cut
            p.append(f"expert {i} slices ({-(-n.d_out // s)}, {-(-d_in // s)}) beyond the meta-seed ({H}, {W})")
    return p


def _task_embed(g: Graph, n: TaskEmbed, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + expr(g, n.table, "table")
    if not p and (len(n.table.shape) != 2 or n.table.shape[1] != g.width(n.src)):
        p.append(f"table has shape {n.table.shape}, expected (tasks, {g.width(n.src)})")
    return p


def _task_scale(g: Graph, n: TaskScale, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source")
    if not n.factors:
        p.append("no per-task factors")
    return p


def _task_contrastive(g: Graph, n: TaskContrastive, need_tensor, need_route, expr) -> list[str]:
    p = need_tensor(g, n.src, "source") + expr(g, n.table, "table")
    if not p and (len(n.table.shape) != 2 or n.table.shape[1] != g.width(n.src)):
        p.append(f"table has shape {n.table.shape}, expected (tasks, {g.width(n.src)})")
    if n.temperature <= 0:
        p.append(f"temperature {n.temperature} is not positive")
    if n.id not in g.aux:
        p.append("a contrastive loss must be listed among the graph's aux losses")
    return p


def register(rules, need_tensor, need_route, expr) -> None:
    """Add this module's rules to the verifier's ``rules``, with its checks."""
    checks = (need_tensor, need_route, expr)
    rules.add(lambda g, n, f=_kronecker_mix: f(g, n, *checks), KroneckerMix)
    rules.add(lambda g, n, f=_task_embed: f(g, n, *checks), TaskEmbed)
    rules.add(lambda g, n, f=_task_scale: f(g, n, *checks), TaskScale)
    rules.add(lambda g, n, f=_task_contrastive: f(g, n, *checks), TaskContrastive)
