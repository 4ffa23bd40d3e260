"""``Graph``: one adapter site as an immutable, topologically ordered tuple of nodes.

The node list is the source of truth; networkx is used privately for analyses
(reachability, users). Passes build new graphs with :meth:`Graph.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import networkx as nx

from .nodes import Input, Node
from .params import ParamDecl
from .types import PerExpertType, RoutingType, TensorType, TreeRoutingType, ValueType

__all__ = ["Graph"]


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

    def type(self, nid: str) -> ValueType:
        """The result type of node ``nid`` (``node.result_type``), computed once per graph."""
        cache = self._cache.setdefault("type", {})
        t = cache.get(nid)
        if t is None:
            t = cache[nid] = self.node(nid).result_type(self)
        return t

    def width(self, nid: str) -> int:
        """Width of tensor node ``nid``'s value ``(T, width)``."""
        return self._expect(nid, TensorType).width

    def routing(self, nid: str) -> RoutingType:
        """The type of flat routing ``nid`` (its experts, its k)."""
        return self._expect(nid, RoutingType)

    def tree_routing(self, nid: str) -> TreeRoutingType:
        """The type of tree routing ``nid`` (experts and fanout per pool)."""
        return self._expect(nid, TreeRoutingType)

    def per_expert(self, nid: str) -> PerExpertType:
        """The type of per-expert value ``nid``."""
        return self._expect(nid, PerExpertType)

    def _expect(self, nid: str, kind: type):
        t = self.type(nid)
        if not isinstance(t, kind):
            raise TypeError(f"%{nid} ({type(self.node(nid)).__name__}) yields a {t}, not a {kind.__name__}")
        return t
