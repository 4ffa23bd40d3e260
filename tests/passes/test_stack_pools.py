"""stack_pools: a pool is one block-gated LoRA of rank E·r (METHODS.md §20.1)."""

from __future__ import annotations

from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases, pool_graphs

from moleforge.ir import BlockGate, PoolMix, print_graph
from moleforge.passes import stack_pools
from moleforge.specs import ExpertPool, TopKRouter


@given(case=cases(pool_graphs()))
def test_properties(case):
    check_pass(stack_pools, *case)


def test_per_expert_pools_become_block_gated():
    out = stack_pools(build(ExpertPool(experts=4, rank=3, alpha=6, router=TopKRouter(k=2))))
    assert not any(isinstance(n, PoolMix) for n in out.nodes)
    text = print_graph(out)
    assert "%mix_down = linear %x W=rows(A) b=- -> 12" in text
    assert "%mix_gated = block_gate %mix_down by %route rank=3 scale=2" in text
    assert "%mix = linear %mix_gated W=cols(B) b=- -> 5" in text


def test_shared_up_projection_is_repeated_per_block():
    out = stack_pools(build(ExpertPool(experts=3, rank=2, up="shared", router=TopKRouter(k=1))))
    assert "W=cat1(B[0], B[0], B[0])" in print_graph(out)
    assert any(isinstance(n, BlockGate) for n in out.nodes)
