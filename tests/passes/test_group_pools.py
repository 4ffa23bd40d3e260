"""group_pools: top-k pools run only their selected experts (grouped GEMMs)."""

from __future__ import annotations

import torch
from hypothesis import given
from pass_properties import check_pass, lowered
from pass_strategies import build, cases, pool_graphs

from moleforge.ir import GroupedMix, interpret
from moleforge.passes import group_pools
from moleforge.specs import DenseRouter, ExpertPool, SigmoidTopKRouter, TopKRouter
from strategies import make_params
from tolerances import assert_close


@given(case=cases(pool_graphs()))
def test_properties(case):
    check_pass(group_pools, *case)


def test_dense_routers_are_not_grouped():
    g = build(ExpertPool(experts=3, rank=2, router=DenseRouter()))
    assert group_pools(g) is g


def test_float32_grouped_gemm_kernel_matches_the_interpreter():
    # float32 with 16-byte aligned rows takes F.grouped_mm; an unused expert gets no rows
    for router in (TopKRouter(k=2), SigmoidTopKRouter(k=3)):
        g = group_pools(build(ExpertPool(experts=6, rank=4, alpha=8, router=router), 8, 12))
        assert any(isinstance(n, GroupedMix) for n in g.nodes)
        params = make_params(g, 7)
        x = torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        ref = interpret(g, params, x)
        gm = lowered(g, params).float()
        x32 = x.float().requires_grad_(True)
        y, _, _ = gm(x32)
        assert_close(y, ref.output, "float32")
        y.sum().backward()
        assert x32.grad is not None and gm.A.grad is not None and gm.B.grad.abs().sum() > 0
