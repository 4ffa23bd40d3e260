"""collapse_linear_trees: identity-activation trees are per-level gated pools (METHODS.md §20.6)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pass_properties import check_pass
from pass_strategies import build, cases, identity_trees, tokens

from moleforge.ir import GateBias, TreeMix, TreePathGates, interpret
from moleforge.passes import collapse_linear_trees
from moleforge.specs import ResidualTree, TreeLevel, TreeRouter
from strategies import graphs, make_params
from tolerances import assert_close


@given(case=cases(st.one_of(graphs(identity_trees()), graphs())))
def test_properties(case):
    check_pass(collapse_linear_trees, *case)


@given(case=cases(graphs(identity_trees())))
def test_identity_trees_lose_their_tree(case):
    out = check_pass(collapse_linear_trees, *case)
    assert not any(isinstance(n, TreeMix) for n in out.nodes)


def _official_tree(gate: str) -> ResidualTree:
    levels = [TreeLevel(experts=3, rank=2, fanout=1, alpha=4.0), TreeLevel(experts=2, rank=1, fanout=1)]
    return ResidualTree(levels=levels, activation="identity", conventions="official", bias=True,
                        router=TreeRouter(gate=gate, down_dim=3, key_dim=2))


def test_unnormalised_official_gates_keep_the_gated_biases_exact():
    # official conventions at fanout 1: the path weight is a raw probability (switch) or a raw
    # cosine logit (noisy), so the biases are weighted by sums of path products, not by 1
    for gate in ("switch", "noisy_topk"):
        g = build(_official_tree(gate))
        out = check_pass(collapse_linear_trees, g, 3, tokens(g))
        assert sum(isinstance(n, GateBias) for n in out.nodes) == 3  # b biases of both pools, W_1's bias


def test_path_gates_sum_the_products_along_each_path():
    g = build(ResidualTree(levels=[TreeLevel(experts=3, rank=1, fanout=2), TreeLevel(experts=2, rank=1, fanout=2)],
                           activation="identity", router=TreeRouter(gate="switch", down_dim=3, key_dim=2)))
    out = collapse_linear_trees(g)
    params, x = make_params(g, 5), tokens(g, T=3)
    res = interpret(out, params, x)
    route = res.values["route"]
    leaf_gates = res.values[next(n.id for n in out.nodes if isinstance(n, TreePathGates) and n.level == 0)].gates
    for t in range(3):
        want = [0.0, 0.0, 0.0]
        for c in range(2):
            for p in range(2):
                e = int(route.indices[0][t, c, p])
                want[e] += float(route.weights[1][t, 0, c] * route.weights[0][t, c, p])
        assert_close(leaf_gates[t], leaf_gates.new_tensor(want))
