"""Pools of experts with their own ranks: the grouped form (each selected expert's own GEMMs)
equals the interpreter, outputs and gradients, lowered; ``choose_pool_kernels`` picks it when its
cost model says so and keeps the dense form otherwise."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from pass_properties import check_pass
from pass_strategies import cases

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import RaggedMix
from moleforge.passes import ChoosePoolKernels
from moleforge.specs import ExpertPool, TopKRouter
from strategies import graphs, pools


def to_grouped(graph):
    """The grouped form of every ragged pool under a top-k routing."""
    return graph.replace(nodes=tuple(replace(n, grouped=True) if isinstance(n, RaggedMix) else n
                                     for n in graph.nodes))


@st.composite
def ragged_topk(draw):
    """A top-k pool of experts of their own ranks, over the options ``strategies.pools`` draws."""
    base = draw(pools(kinds=("topk", "sigmoid_topk")))
    E = base.experts
    return ExpertPool(experts=E, ranks=draw(st.lists(st.integers(1, 4), min_size=E, max_size=E)),
                      alpha=base.alpha, router=base.router, aux_losses=base.aux_losses, dropout=base.dropout,
                      capacity_factor=base.capacity_factor, shared_expert=base.shared_expert,
                      frozen_experts=base.frozen_experts,
                      scaling=draw(st.sampled_from(["alpha_over_rank", "rslora", "alpha_over_total_rank"])))


@given(case=cases(graphs(ragged_topk())))
def test_grouped_form_equals_the_interpreter(case):
    out = check_pass(to_grouped, *case)
    assert any(isinstance(n, RaggedMix) and n.grouped for n in out.nodes)


def test_the_cost_model_picks_the_form():
    spec = ExpertPool(experts=64, ranks=[2, 4] * 32, router=TopKRouter(k=2))
    wide = build_graph(spec, SiteShape("s", 1024, 1024))
    chosen = ChoosePoolKernels(tokens=4096)(wide)
    assert next(n for n in chosen.nodes if isinstance(n, RaggedMix)).grouped
    small = build_graph(ExpertPool(experts=3, ranks=[1, 2, 3], router=TopKRouter(k=2)), SiteShape("s", 8, 8))
    assert ChoosePoolKernels()(small) == small
