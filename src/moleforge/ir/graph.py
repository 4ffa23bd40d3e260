"""``Graph``: one adapter site as an immutable, topologically ordered tuple of nodes.

The node list is the source of truth; networkx is used privately for analyses
(reachability, users). Passes build new graphs with :meth:`Graph.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import networkx as nx

from .nodes import (
    Add,
    AuxLoss,
    BlockGate,
    Columns,
    ExpertFFN,
    ExpertHidden,
    ExpertLoRA,
    ExpertSum,
    GateBias,
    GroupedMix,
    Input,
    Jitter,
    Linear,
    Node,
    OuterGate,
    PoolMix,
    Route,
    SiblingLinear,
    TreeMix,
    TreePathGates,
    TreePropagate,
    TreeRoute,
)
from .params import ParamDecl, expr_shape

__all__ = ["Graph", "width_of"]


@dataclass(frozen=True)
class Graph:
    """An adapter site: ``delta = output(x)`` plus named aux losses.

    Attributes:
        nodes: topologically ordered nodes; exactly one :class:`Input`.
        output: id of the tensor node whose value is the site's ``Δy (T, d_out)``.
        aux: ids of :class:`AuxLoss` nodes (their sum is the site's aux loss).
        params: the tensors the site stores.
        d_in, d_out: widths of the adapted linear.
        label: a readable name (the module path, once resolved).
        frozen: frozen inputs: tensors of the model the graph reads but never stores or
            trains (an FFN block's own weights); bound by the backend at run time.
    """

    nodes: tuple[Node, ...]
    output: str
    aux: tuple[str, ...]
    params: tuple[ParamDecl, ...]
    d_in: int
    d_out: int
    label: str = "site"
    frozen: tuple[ParamDecl, ...] = ()
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @cached_property
    def by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    def node(self, nid: str) -> Node:
        return self.by_id[nid]

    @cached_property
    def param_decls(self) -> dict[str, ParamDecl]:
        return {p.name: p for p in self.params}

    @cached_property
    def all_decls(self) -> dict[str, ParamDecl]:
        """Stored parameters and frozen inputs by name."""
        return {p.name: p for p in (*self.params, *self.frozen)}

    def dag(self) -> "nx.DiGraph":
        """The dataflow as a networkx DiGraph (edges producer -> consumer)."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.id)
            for i in n.inputs():
                g.add_edge(i, n.id)
        return g

    def users(self, nid: str) -> list[Node]:
        return [n for n in self.nodes if nid in n.inputs()]

    def live_ids(self) -> set[str]:
        """Ids of nodes the output or an aux loss depends on."""
        g = self.dag()
        live: set[str] = set()
        for root in (self.output, *self.aux):
            if root in g:
                live |= nx.ancestors(g, root) | {root}
        return live

    def replace(self, **changes) -> "Graph":
        """A new graph with fields replaced (caches are not carried over)."""
        changes.setdefault("_cache", {})
        return replace(self, **changes)

    def input_node(self) -> Input:
        return next(n for n in self.nodes if isinstance(n, Input))

    def width(self, nid: str) -> int:
        return width_of(self, nid)


def width_of(graph: Graph, nid: str) -> int:
    """Width of a tensor node's value ``(T, width)``; experts for a routing; 0 for scalars."""
    cache = graph._cache.setdefault("width", {})
    if nid in cache:
        return cache[nid]
    n = graph.node(nid)
    match n:
        case Input(width=w):
            out = w
        case Linear(weight=wt) | SiblingLinear(weight=wt):
            out = expr_shape(wt)[0]
        case Columns(start=a, stop=b):
            out = b - a
        case Add(srcs=s):
            out = width_of(graph, s[0])
        case Jitter(src=s):
            out = width_of(graph, s)
        case Route(experts=e):
            out = e
        case PoolMix(b=b) | GroupedMix(b=b):
            out = expr_shape(b)[1]
        case BlockGate(src=s):
            out = width_of(graph, s)
        case OuterGate(src=s, routing=r):
            out = width_of(graph, s) * width_of(graph, r)
        case TreeMix(levels=lv) | TreePropagate(levels=lv):
            out = lv[-1].b.shape[1]
        case TreeRoute(levels=lv):
            out = len(lv)
        case TreePathGates(routing=r, level=l):
            levels = getattr(graph.node(r), "levels", ())
            out = levels[l].experts if 0 <= l < len(levels) else 0
        case GateBias(bias=b):
            out = expr_shape(b)[-1]
        case AuxLoss():
            out = 0
        case ExpertFFN(down=d):
            out = d.weight.shape[0]
        case ExpertLoRA(b=b):
            out = b.shape[1]
        case ExpertHidden(up=u):
            out = u.weight.shape[0]
        case ExpertSum(src=s):
            out = width_of(graph, s)
        case _:
            raise TypeError(f"unknown node kind {type(n).__name__}")
    cache[nid] = out
    return out
