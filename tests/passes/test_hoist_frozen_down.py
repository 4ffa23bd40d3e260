"""``hoist_frozen_down``: the frozen down projection leaves the expert sum,
``Σ g_i (h_i W_d) = (Σ g_i h_i) W_d``, alone and after ``share_frozen_projections`` as the block
pipeline runs them; an identity of the interpreter, and not applied where it would not be one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ffn_block_helpers import REWRITES, block_graphs, check_block_rewrite
from moleforge.compiler.build import SiteShape, build_block_graph
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import print_graph
from moleforge.passes.hoist_frozen_down import hoist_frozen_down
from moleforge.specs import ExpertPool, TopKRouter


@pytest.mark.parametrize("name", ["hoist_frozen_down", "both"])
@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_rewrite_keeps_outputs_and_gradients(name, graph, seed, T):
    check_block_rewrite(REWRITES[name], graph, seed, T)


def test_rewrites_produce_the_hoisted_form():
    graph = build_block_graph(ExpertPool(experts=4, rank=2, router=TopKRouter(k=2)),
                              {"gate": BlockLinear("gate", "g", 3, 5, False, False),
                               "up": BlockLinear("up", "u", 3, 5, False, False),
                               "down": BlockLinear("down", "d", 5, 3, True, False)},
                              "silu", ["gate", "up", "down"], SiteShape(label="block", d_in=3, d_out=3))
    text = print_graph(REWRITES["both"](graph))
    assert "expert_ffn" not in text
    for line in ("%experts_gate_base = linear %x W=W_gate b=- -> 5",
                 "%experts_sum = expert_sum %experts_hidden by %route -> 5",
                 "%experts_down = linear %experts_sum W=W_down b=b_down -> 3",
                 "%experts = add %experts_down %experts_down_lora"):
        assert line in text, text


def test_hoisting_needs_gates_summing_to_one_when_down_has_a_bias():
    linears = {"up": BlockLinear("up", "u", 3, 4, False, False),
               "down": BlockLinear("down", "d", 4, 3, True, False)}
    pool = ExpertPool(experts=3, rank=2, router=TopKRouter(k=2, renormalize=False))
    shape = SiteShape(label="block", d_in=3, d_out=3)
    graph = build_block_graph(pool, linears, "relu", ["up", "down"], shape)
    assert hoist_frozen_down(graph) is graph
