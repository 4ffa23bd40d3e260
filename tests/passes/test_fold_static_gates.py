"""fold_static_gates: one-expert routers fold into a plain LoRA chain."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pass_properties import check_pass
from pass_strategies import build, cases, one_expert_pools, tokens

from moleforge.ir import BlockGate, GroupedMix, Linear, PoolMix, Route, print_graph
from moleforge.passes import fold_static_gates
from moleforge.specs import DenseRouter, ExpertPool, StaticRouter, SwitchLoadBalance, TopKRouter
from strategies import graphs


@given(case=cases(st.one_of(graphs(one_expert_pools()), graphs())))
def test_properties(case):
    check_pass(fold_static_gates, *case)


@given(case=cases(graphs(one_expert_pools().filter(lambda p: not isinstance(p.router, StaticRouter)))))
def test_one_expert_pools_become_lora_chains(case):
    out = check_pass(fold_static_gates, *case)
    assert not any(isinstance(n, (PoolMix, GroupedMix, BlockGate)) for n in out.nodes)
    assert any(isinstance(n, Linear) for n in out.nodes)


def test_dense_one_expert_pool_golden():
    out = fold_static_gates(build(ExpertPool(experts=1, rank=2, alpha=8, router=DenseRouter())))
    lines = [ln.strip() for ln in print_graph(out).splitlines()]
    assert lines[-3:] == ["%mix_down = linear %x W=A[0] b=- -> 2",
                          "%mix = linear %mix_down W=B[0] b=- scale=4 -> 5",
                          "return %mix"]
    assert not any(isinstance(n, Route) for n in out.nodes), "the router is dead once folded"


def test_router_read_by_an_aux_loss_is_kept():
    g = build(ExpertPool(experts=1, rank=2, router=TopKRouter(k=1), aux_losses=[SwitchLoadBalance(weight=0.1)]))
    out = check_pass(fold_static_gates, g, 1, tokens(g))
    assert any(isinstance(n, Route) for n in out.nodes)


def test_pools_of_several_experts_are_untouched():
    g = build(ExpertPool(experts=3, rank=2, router=TopKRouter(k=2)))
    assert fold_static_gates(g) is g


def test_one_expert_static_pool_keeps_its_weight():
    """Regression: a static router over one expert gates it by its stored weight ``w``, not 1;
    folding it into a plain LoRA chain dropped ``w`` from the output and its gradient."""
    for router in (StaticRouter(), StaticRouter(trainable=False)):
        g = build(ExpertPool(experts=1, rank=2, router=router))
        assert fold_static_gates(g) is g
        check_pass(fold_static_gates, g, 1, tokens(g))
