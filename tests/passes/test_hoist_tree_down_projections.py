"""hoist_tree_down_projections: one GEMM for the down-projections of every pool (METHODS.md §20.7)."""

from __future__ import annotations

from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases, tree_graphs

from moleforge.ir import Linear, TreeMix, TreePropagate, expr_shape, print_graph
from moleforge.passes import hoist_tree_down_projections
from moleforge.specs import presets


@given(case=cases(tree_graphs()))
def test_properties(case):
    check_pass(hoist_tree_down_projections, *case)


def test_smore_reads_all_residuals_from_one_gemm_of_width_d_L():
    out = hoist_tree_down_projections(build(presets.load("smore").sites[0].adapter, 16, 24))
    assert not any(isinstance(n, TreeMix) for n in out.nodes)
    prop = next(n for n in out.nodes if isinstance(n, TreePropagate))
    down = out.node(prop.src)
    assert isinstance(down, Linear) and expr_shape(down.weight) == (64, 16)
    assert "%tree_down = linear %x W=cat0(rows(A0), rows(A1)) b=cat0(A0_bias[0]," in print_graph(out)
