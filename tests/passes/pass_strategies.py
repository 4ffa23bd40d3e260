"""Graph strategies aimed at particular passes, built from the shared ones in ``strategies``."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import Graph
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import (
    DenseRouter,
    ExpertPool,
    ImplicitTopKRouter,
    SigmoidTopKRouter,
    SparseRandom,
    StaticRouter,
    TopKRouter,
)
from strategies import graphs, inputs_for, mixed_pools, pools, rank_partitions, trees

__all__ = ["one_expert_pools", "identity_trees", "pool_graphs", "tree_graphs", "pipeline_prefix", "cases"]


@st.composite
def one_expert_pools(draw):
    """Pools over a single expert: their gates are the constant 1, but for a static router's (its
    weight)."""
    if draw(st.booleans()):
        return ExpertPool(experts=1, rank=1, down=SparseRandom(density=1.0), router=ImplicitTopKRouter(k=1),
                          alpha=2.0, scaling="alpha_over_total_rank")
    router = draw(st.sampled_from([TopKRouter(k=1), TopKRouter(k=1, renormalize=False, temperature=0.5),
                                   TopKRouter(k=1, jitter=0.1), DenseRouter(), SigmoidTopKRouter(k=1),
                                   StaticRouter(), StaticRouter(trainable=False)]))
    base = draw(pools())
    # no capacity (it can drop the only expert: the gate is not 1) and one rank for all experts
    return base.model_copy(update={"experts": 1, "router": router, "capacity_factor": None, "ranks": None,
                                   "aux_losses": base.aux_losses if isinstance(router, TopKRouter) else []})


def identity_trees():
    """Trees whose propagation is linear in the form ``collapse_linear_trees`` rewrites: the
    identity activation on the whole message (position ``all``)."""
    return trees().map(lambda t: t.model_copy(update={"activation": "identity", "activation_position": "all"}))


def pool_graphs():
    return graphs(st.one_of(pools(), rank_partitions(), mixed_pools()))


def tree_graphs():
    return graphs(st.one_of(trees(), identity_trees()))


def pipeline_prefix(graph: Graph, until) -> Graph:
    """``graph`` after the default-pipeline passes that precede ``until``."""
    names = [getattr(p, "__name__", "") for p in DEFAULT_PIPELINE]
    return run_pipeline(graph, DEFAULT_PIPELINE[:names.index(until.__name__)])


@st.composite
def cases(draw, graph_strategy):
    """``(graph, parameter seed, input)``."""
    graph = draw(graph_strategy)
    x = draw(inputs_for(graph))
    return graph, draw(st.integers(0, 2**16)), x


def shape(d_in: int, d_out: int) -> SiteShape:
    return SiteShape(label="site", d_in=d_in, d_out=d_out)


def build(adapter, d_in: int = 6, d_out: int = 5) -> Graph:
    return build_graph(adapter, shape(d_in, d_out))


def tokens(graph: Graph, T: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, graph.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
