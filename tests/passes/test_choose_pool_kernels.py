"""choose_pool_kernels: the cost model picks dense block-gated or grouped per pool."""

from __future__ import annotations

from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases, pool_graphs, tokens

from moleforge.ir import BlockGate, GroupedMix, OuterGate, PoolMix
from moleforge.passes import ChoosePoolKernels, choose_pool_kernels, pool_cost
from moleforge.specs import DenseRouter, ExpertPool, Shared, TopKRouter


@given(case=cases(pool_graphs()))
def test_properties(case):
    out = check_pass(choose_pool_kernels, *case)
    assert not any(isinstance(n, PoolMix) for n in out.nodes)


def test_molora_shapes_stay_dense_and_wide_sparse_pools_go_grouped():
    assert pool_cost(8, 8, 512, 512, k=2, tokens=1024).choice == "dense"      # E·r = 64, k/E = 1/4
    assert pool_cost(8, 8, 512, 1408, k=2, tokens=1024).choice == "dense"
    assert pool_cost(64, 8, 512, 512, k=2, tokens=1024).choice == "grouped"   # E·r = 512
    assert pool_cost(16, 16, 512, 512, k=2, tokens=1024).choice == "grouped"
    assert pool_cost(64, 8, 512, 512, k=None, tokens=1024).choice == "dense"  # dense router: no choice
    assert pool_cost(64, 8, 512, 512, k=2, tokens=4).choice == "dense"        # a few tokens: overheads win


def test_wide_pool_is_rewritten_grouped_and_keeps_its_meaning():
    g = build(ExpertPool(experts=64, rank=8, router=TopKRouter(k=2)), 8, 8)
    out = check_pass(ChoosePoolKernels(tokens=4096), g, 4, tokens(g))
    assert any(isinstance(n, GroupedMix) for n in out.nodes)


def test_shared_down_goes_outer_and_dense_router_goes_block_gated():
    shared = choose_pool_kernels(build(ExpertPool(experts=3, rank=2, down=Shared(), router=TopKRouter(k=1))))
    assert any(isinstance(n, OuterGate) for n in shared.nodes)
    dense = choose_pool_kernels(build(ExpertPool(experts=3, rank=2, router=DenseRouter())))
    assert any(isinstance(n, BlockGate) for n in dense.nodes)
