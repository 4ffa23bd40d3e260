"""One negative test per verifier rule: a corrupted graph raises with the rule and the printed graph."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import IRVerificationError
from moleforge.ir import Input, Linear, ParamDecl, ParamRef, PoolMix, verify
from moleforge.specs import ExpertPool, LoRA, ResidualTree, TopKRouter


def _pool_graph():
    return verify(build_graph(ExpertPool(experts=3, rank=2, router=TopKRouter(k=2)), SiteShape("s", 5, 7)))


def _nodes(g, **swap):
    return tuple(swap.get(n.id, n) for n in g.nodes)


def _raises(g, match):
    with pytest.raises(IRVerificationError, match=match) as info:
        verify(g)
    assert "graph s" in str(info.value)  # the printed graph follows


def test_valid_graphs_verify():
    for a in (LoRA(), ExpertPool(), ResidualTree()):
        verify(build_graph(a, SiteShape("s", 6, 9)))


def test_use_before_definition():
    g = _pool_graph()
    nodes = list(g.nodes)
    nodes[1], nodes[2] = nodes[2], nodes[1]
    _raises(g.replace(nodes=tuple(nodes)), "before it is defined")


def test_duplicate_id():
    g = _pool_graph()
    _raises(g.replace(nodes=g.nodes + (g.nodes[1],)), "defined twice")


def test_two_inputs():
    g = _pool_graph()
    _raises(g.replace(nodes=(Input(id="y", width=5),) + g.nodes), "exactly one input")


def test_undeclared_parameter():
    g = _pool_graph()
    bad = Linear(id="logits", src="x", weight=ParamRef("nowhere", (3, 5)))
    _raises(g.replace(nodes=_nodes(g, logits=bad)), "undeclared parameter 'nowhere'")


def test_parameter_shape_disagrees_with_declaration():
    g = _pool_graph()
    params = tuple(ParamDecl(p.name, (3, 4), p.init) if p.name == "router_w" else p for p in g.params)
    _raises(g.replace(params=params), "declared")


def test_linear_reads_wrong_width():
    g = verify(build_graph(LoRA(rank=2), SiteShape("s", 5, 7)))
    params = tuple(ParamDecl("A", (2, 4), "kaiming") if p.name == "A" else p for p in g.params)
    nodes = _nodes(g, h=Linear(id="h", src="x", weight=ParamRef("A", (2, 4))))
    _raises(g.replace(params=params, nodes=nodes), "does not read width")


def test_routing_input_must_be_a_router():
    g = _pool_graph()
    mix = g.node("mix")
    _raises(g.replace(nodes=_nodes(g, mix=replace(mix, routing="logits"))), "is not a Route")


def test_pool_rank_mismatch():
    g = _pool_graph()
    params = tuple(ParamDecl("B", (3, 7, 3), "up") if p.name == "B" else p for p in g.params)
    mix: PoolMix = g.node("mix")  # type: ignore[assignment]
    nodes = _nodes(g, mix=replace(mix, b=ParamRef("B", (3, 7, 3))))
    _raises(g.replace(params=params, nodes=nodes), "rank of A")


def test_output_width():
    g = _pool_graph()
    _raises(g.replace(d_out=8), "output width 7 != d_out 8")


def test_dead_node():
    g = _pool_graph()
    extra = Linear(id="unused", src="x", weight=ParamRef("router_w", (3, 5)))
    _raises(g.replace(nodes=g.nodes + (extra,)), "dead nodes")


def test_tree_width_rule():
    g = verify(build_graph(ResidualTree(), SiteShape("s", 6, 9)))
    tree = g.node("tree")
    lv = tree.levels[1]
    bad = replace(tree, levels=(tree.levels[0], replace(lv, w=None, w_bias=None)))
    _raises(g.replace(nodes=_nodes(g, tree=bad)), "level transform W exists exactly for l >= 1")


def test_aux_must_name_aux_losses():
    g = _pool_graph()
    _raises(g.replace(aux=("mix",)), "is not an aux loss")
