"""Helpers shared by the passes: node-by-node rewriting with fresh ids, and dead-node removal.

A rewrite replaces one node by a short sequence whose last node keeps the replaced id, so
every consumer stays wired without being touched.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..ir import Graph, Node

__all__ = ["Ids", "rewrite_nodes", "prune"]


class Ids:
    """Fresh node ids for one rewrite: ``Ids(graph).new("mix_down")`` gives that id, or
    ``mix_down_2``... when it is taken."""

    def __init__(self, graph: Graph):
        self._taken = {n.id for n in graph.nodes}

    def new(self, base: str) -> str:
        nid, i = base, 2
        while nid in self._taken:
            nid, i = f"{base}_{i}", i + 1
        self._taken.add(nid)
        return nid


Rule = Callable[[Node, Graph, Ids], "Iterable[Node] | None"]


def rewrite_nodes(graph: Graph, rule: Rule) -> Graph:
    """Apply ``rule`` to every node in order; ``None`` keeps the node, a sequence replaces it.
    Returns ``graph`` itself when nothing changed (so passes are cheap to re-run)."""
    ids = Ids(graph)
    out: list[Node] = []
    changed = False
    for n in graph.nodes:
        new = rule(n, graph, ids)
        if new is None:
            out.append(n)
            continue
        out.extend(new)
        changed = True
    return prune(graph.replace(nodes=tuple(out))) if changed else graph


def prune(graph: Graph) -> Graph:
    """Drop nodes neither the output nor an aux loss depends on."""
    live = graph.live_ids()
    kept = tuple(n for n in graph.nodes if n.id in live)
    return graph if len(kept) == len(graph.nodes) else graph.replace(nodes=kept)
