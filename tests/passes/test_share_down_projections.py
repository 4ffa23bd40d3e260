"""share_down_projections: a shared A is applied once, then gated by an outer product (§20.3)."""

from __future__ import annotations

from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases, pool_graphs

from moleforge.ir import OuterGate, PoolMix, print_graph
from moleforge.passes import share_down_projections
from moleforge.specs import presets


@given(case=cases(pool_graphs()))
def test_properties(case):
    check_pass(share_down_projections, *case)


def test_hydralora_computes_its_down_projection_once():
    out = share_down_projections(build(presets.load("hydralora").sites[0].adapter, 12, 10))
    assert not any(isinstance(n, PoolMix) for n in out.nodes)
    assert any(isinstance(n, OuterGate) for n in out.nodes)
    assert "%mix_down = linear %x W=A[0] b=- -> 8" in print_graph(out)
