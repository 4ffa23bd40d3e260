"""merge_cores: CoMoL's mixture of full core-space experts equals one soft-merged core per token
(METHODS.md §9, §20.4)."""

from __future__ import annotations

import torch
from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases

from moleforge.ir import CoreExperts, CoreMerge, interpret, print_graph
from moleforge.passes import merge_cores
from moleforge.report.flops import flops_per_token
from moleforge.specs import CorePool, DenseRouter, ExpertPool, TopKRouter
from strategies import core_pools, graphs, make_params
from tolerances import assert_close


@given(case=cases(graphs(core_pools())))
def test_properties(case):
    """Verifies, keeps the interpreter's output and aux losses, the lowered module's outputs and
    gradients equal the interpreter of the unmerged graph; idempotent; the input is not mutated."""
    check_pass(merge_cores, *case)


def test_the_experts_become_one_merged_core():
    graph = build(CorePool(experts=3, rank=2, alpha=4.0, router=DenseRouter()))
    out = merge_cores(graph)
    assert not any(isinstance(n, CoreExperts) for n in out.nodes)
    text = print_graph(out)
    assert "%mix_core = core_merge %h by %route M=cores -> 2" in text
    assert "%mix = linear %mix_core W=B b=- scale=2 -> 5" in text
    # 2·E·r·(r + d_out) -> 2·E·r² + 2·r·d_out (plus the shared A and the router, the same in both)
    assert flops_per_token(graph) - flops_per_token(out) == 2 * 3 * 2 * (2 + 5) - (2 * 3 * 4 + 2 * 2 * 5)


def test_merged_core_by_hand():
    """Two experts, gates (0.25, 0.75): the merged core is ``0.25 M_0 + 0.75 M_1``."""
    graph = merge_cores(build(CorePool(experts=2, rank=2, router=TopKRouter(k=2, renormalize=False)), 2, 3))
    params = make_params(graph, 1)
    params["router_w"] = torch.eye(2, dtype=torch.float64)
    params["A"] = torch.eye(2, dtype=torch.float64)  # h = x
    x = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()  # softmax(h) = (0.25, 0.75)
    res = interpret(graph, params, x)
    core = next(n.id for n in graph.nodes if isinstance(n, CoreMerge))
    M = params["cores"]
    assert_close(res.values[core][0], (0.25 * M[0] + 0.75 * M[1]) @ x[0])
    assert_close(res.output[0], params["B"] @ res.values[core][0])


def test_other_graphs_are_unchanged():
    pool = build(ExpertPool(experts=2, rank=2))
    assert merge_cores(pool) is pool
    once = merge_cores(build(CorePool(experts=2, rank=2)))
    assert merge_cores(once) is once
