"""fuse_shared_input_linears: the router (and a shared expert) join the down-projection GEMM."""

from __future__ import annotations

from hypothesis import given
from pass_properties import check_pass
from pass_strategies import build, cases, pipeline_prefix

from moleforge.ir import Columns, Linear, print_graph
from moleforge.passes import choose_pool_kernels, fuse_shared_input_linears, run_pipeline
from moleforge.specs import ExpertPool, LoRA, TopKRouter
from strategies import graphs


@given(case=cases(graphs()))
def test_properties(case):
    graph, seed, x = case
    check_pass(fuse_shared_input_linears, pipeline_prefix(graph, fuse_shared_input_linears), seed, x)


def test_router_and_shared_expert_join_the_down_projection():
    g = build(ExpertPool(experts=4, rank=2, router=TopKRouter(k=2), shared_expert=LoRA(rank=3)))
    out = fuse_shared_input_linears(run_pipeline(g, (choose_pool_kernels,)))
    reads_x = [n for n in out.nodes if isinstance(n, Linear) and n.src == "x"]
    assert len(reads_x) == 1
    assert "W=cat0(router_w, rows(A), shared_A) b=- -> 15" in print_graph(out)
    assert [n.id for n in out.nodes if isinstance(n, Columns)] == ["logits", "mix_down", "shared_h"]
