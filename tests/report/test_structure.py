"""Γ (structural flexibility) against a brute force: every routing of one token is enumerated on
small trees, its output is built from the propagation formulas (symbolically, and numerically with
random parameters), and the distinct structures are counted; the closed forms of
``moleforge.report.structure`` must give the same number for every activation and position.
Huge pools and trees come back fast, as an estimate that prints ``≈ m × 10^e``."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moleforge as mf
from models import tiny
from moleforge.report.structure import EXACT_DIGITS, GammaEstimate, format_gamma, pool_gamma, tree_gamma

CASES = [("tanh", "all"), ("relu", "all"), ("tanh", "child"), ("tanh", "child_v2"),
         ("identity", "all"), ("identity", "child"), ("identity", "child_v2")]

# (experts, fanout) per pool, leaves first: 1-3 levels, 2-4 experts, fanouts 1-3
SHAPES = [
    [(2, 1)], [(3, 2)], [(4, 2)], [(4, 3)], [(3, 3)],
    [(4, 2), (4, 2)],  # the smore preset
    [(3, 1), (4, 2)], [(4, 3), (3, 2)], [(2, 1), (3, 3)], [(4, 3), (4, 3)], [(4, 1), (4, 3)],
    [(2, 2), (4, 2)], [(3, 2), (2, 1)], [(4, 2), (3, 3)],
    [(3, 2), (3, 2), (3, 2)], [(2, 1), (3, 2), (4, 2)], [(4, 2), (3, 1), (4, 2)], [(4, 3), (2, 1), (3, 2)],
    [(2, 1), (2, 1), (4, 3)], [(4, 2), (2, 2), (3, 1)], [(2, 2), (3, 2), (4, 2)], [(4, 2), (4, 2), (4, 1)],
]


# ---- brute force ---------------------------------------------------------------------------------

def routings(levels, ordered=False):
    """Every routing of one token, top-down: each tree node picks ``f`` distinct children of the
    pool below (``ordered``: as the router's top-f index tuple, else as a set); a routing is the
    root's ``((expert, that child's routing), …)`` (``None`` below the leaves)."""
    def choices(l):
        s, f = levels[l]
        picks = itertools.permutations(range(s), f) if ordered else itertools.combinations(range(s), f)
        below = [None] if l == 0 else list(choices(l - 1))
        for experts in picks:
            for subs in itertools.product(below, repeat=f):
                yield tuple(zip(experts, subs))
    return choices(len(levels) - 1)


# Symbolic outputs: a sum is a Counter of terms, frozen as a frozenset of (term, multiplicity);
# terms are ("u", l, e) (the residual of expert e of pool l), ("b", l) (the bias of the level
# transform W_l), ("W", l, term) and ("σ", sum). W_l is linear (it maps a sum term by term); σ is
# opaque unless it is the identity.

def _sum(*parts):
    total = Counter()
    for p in parts:
        total.update(dict(p))
    return frozenset(total.items())


def _atom(*term):
    return frozenset({(term, 1)})


def _w(l, x):
    return frozenset((("W", l, t), c) for t, c in x)


def _sigma(x, activation):
    return x if activation == "identity" else _atom("σ", x)


def symbolic(node, l, activation, position):
    """The hidden of a tree node whose children come from pool ``l``, with every gate 1 (the
    router's gates as binary masks), by the formulas of ``TreeMix`` (ir/nodes.py)."""
    terms = []
    for e, sub in node:
        u = _atom("u", l, e)
        if position == "all":  # Σ_p w_p σ(u + W h_child + w), leaves Σ_p w_p σ(u)
            inner = u if l == 0 else _sum(u, _w(l, symbolic(sub, l - 1, activation, position)), _atom("b", l))
            terms.append(_sigma(inner, activation))
        elif position == "child":  # Σ_p (w_p u + W σ(h_child) + w), leaves Σ_p w_p u
            terms += [u] if l == 0 else [u, _w(l, _sigma(symbolic(sub, l - 1, activation, position), activation)),
                                         _atom("b", l)]
        else:  # child_v2: Σ_p w_p (u + W σ(h_child) + w), leaves Σ_p w_p u
            terms.append(u if l == 0 else _sum(u, _w(l, _sigma(symbolic(sub, l - 1, activation, position),
                                                               activation)), _atom("b", l)))
    return _sum(*terms)


def structure(root, levels, activation, position):
    """What Γ tells apart. σ nonlinear: the output itself. σ = identity: the output is linear in
    the residuals, Σ (count) · W…W u_{l,e}: a flat mixture of the pools' experts whose gates are the
    path-aggregated weights (METHODS.md §20.6), and the structure of a flat mixture is its set of
    active experts — the counts only scale the gates."""
    out = symbolic(root, len(levels) - 1, activation, position)
    return frozenset(t for t, _ in out) if activation == "identity" else out


def brute_force(levels, activation, position, ordered=False):
    return len({structure(r, levels, activation, position) for r in routings(levels, ordered)})


def numeric_outputs(levels, activation, position, seed=0):
    """Distinct root hiddens of every routing, computed in float64 with random residuals, level
    transforms and biases (widths d_{l+1} = d_l + 2 s_l) and every gate 1."""
    rng = np.random.default_rng(seed)
    act = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "identity": lambda v: v}[activation]
    widths = [0]
    for s, _ in levels:
        widths.append(widths[-1] + 2 * s)
    u = [rng.normal(size=(s, widths[l + 1])) for l, (s, _) in enumerate(levels)]
    W = [None] + [rng.normal(size=(widths[l + 1], widths[l])) for l in range(1, len(levels))]
    b = [None] + [rng.normal(size=widths[l + 1]) for l in range(1, len(levels))]

    def hidden(node, l):
        h = np.zeros(widths[l + 1])
        for e, sub in node:
            if l == 0:
                h += act(u[0][e]) if position == "all" else u[0][e]
            elif position == "all":
                h += act(u[l][e] + W[l] @ hidden(sub, l - 1) + b[l])
            else:  # child and child_v2 with unit gates
                h += u[l][e] + W[l] @ act(hidden(sub, l - 1)) + b[l]
        return h

    return len({tuple(np.round(hidden(r, len(levels) - 1), 9)) for r in routings(levels)})


def _n_routings(levels):
    n, parents = 1, 1
    for s, f in reversed(levels):
        n *= math.comb(s, f) ** parents
        parents *= f
    return n


# ---- the closed forms against the brute force ---------------------------------------------------

@pytest.mark.parametrize("levels", SHAPES, ids=lambda v: "-".join(f"{s}c{f}" for s, f in v))
@pytest.mark.parametrize("activation,position", CASES)
def test_gamma_is_the_number_of_distinct_structures(levels, activation, position):
    assert tree_gamma(levels, activation, position) == brute_force(levels, activation, position)


@pytest.mark.parametrize("levels", [[(4, 2), (4, 2)], [(3, 2), (2, 1)], [(2, 1), (2, 1), (3, 2)]],
                         ids=["4c2-4c2", "3c2-2c1", "2c1-2c1-3c2"])
@pytest.mark.parametrize("activation,position", CASES)
def test_the_order_of_the_routers_top_f_indices_is_no_structure(levels, activation, position):
    assert brute_force(levels, activation, position, ordered=True) == tree_gamma(levels, activation, position)


@pytest.mark.parametrize("levels", [lv for lv in SHAPES if _n_routings(lv) <= 2500],
                         ids=lambda v: "-".join(f"{s}c{f}" for s, f in v))
@pytest.mark.parametrize("activation,position", [c for c in CASES if c[0] == "tanh"])
def test_nonlinear_counts_are_distinct_numeric_outputs(levels, activation, position):
    """With random parameters the distinct outputs are exactly the distinct structures (tanh is
    analytic, so generic parameters tell every structure apart; ReLU at one input may zero the
    coordinates where two structures differ, so it is left to the symbolic count)."""
    assert numeric_outputs(levels, activation, position) == tree_gamma(levels, activation, position)


def test_identity_outputs_differ_only_in_gate_values_beyond_the_flat_count():
    """σ = identity, gates 1: distinct outputs are distinct visit counts per expert (the symbolic
    sums before the collapse); Γ counts their supports, the flat mixture's active sets."""
    levels = [(4, 2), (4, 2)]
    for position in ("all", "child", "child_v2"):
        sums = {symbolic(r, 1, "identity", position) for r in routings(levels)}
        assert numeric_outputs(levels, "identity", position) == len(sums) > 66
        assert len({frozenset(t for t, _ in s) for s in sums}) == 66 == tree_gamma(levels, "identity", position)


@given(st.lists(st.tuples(st.integers(2, 4), st.integers(1, 3)), min_size=1, max_size=3)
       .map(lambda lv: [(s, min(f, s)) for s, f in lv])
       .filter(lambda lv: _n_routings(lv) <= 1500),
       st.sampled_from(CASES))
def test_gamma_matches_the_brute_force_on_random_shapes(levels, case):
    assert tree_gamma(levels, *case) == brute_force(levels, *case)


# ---- specs ----------------------------------------------------------------------------------

def _smore(**changes):
    spec = mf.presets.load("smore").model_dump()
    spec["sites"][0]["adapter"].update(changes)
    return spec


@pytest.mark.parametrize("changes,want", [
    ({}, 216),
    ({"activation": "relu"}, 216),
    ({"activation_position": "child_v2"}, 126),
    ({"activation_position": "child"}, 126),
    ({"activation": "identity"}, 66),
    ({"activation": "identity", "activation_position": "child_v2"}, 66),
    ({"router": {"gate": "dense"}, "aux_losses": [], "levels": [{"experts": 4, "rank": 8, "fanout": None}] * 2}, 1),
])
def test_structural_flexibility_of_the_smore_shape_follows_the_activation(changes, want):
    assert mf.structural_flexibility(_smore(**changes)) == want
    from moleforge.compiler import structural_flexibility
    assert structural_flexibility(_smore(**changes)) == want


@pytest.mark.parametrize("changes,text", [
    ({}, "216 = C(4,2)^1 x C(4,2)^2 routing structures per token"),
    ({"activation": "identity"}, "66 = C(4,2) x Σ_{i=2..4} C(4,i) sets of active experts per token"),
    ({"activation_position": "child_v2"}, "Γ_2 = C(4,2) x C(6+1,2) = 126"),
])
def test_explain_prints_the_count_of_the_activation(changes, text):
    explained = " ".join(mf.explain(_smore(**changes), tiny("llama"), ir="none").split())
    assert text in explained


# ---- huge counts ----------------------------------------------------------------------------

def _huge_pool():
    pool = {"kind": "pool", "experts": 10**9, "rank": 1, "router": {"kind": "topk", "k": 10**6}}
    return {"sites": [{"target": {"roles": ["up"]}, "adapter": pool}]}


def test_a_billion_experts_top_a_million_comes_back_at_once_as_an_estimate():
    start = time.perf_counter()
    gamma = mf.structural_flexibility(_huge_pool())
    assert time.perf_counter() - start < 1.0
    assert isinstance(gamma, GammaEstimate) and math.isinf(gamma)
    ln = math.lgamma(10**9 + 1) - math.lgamma(10**6 + 1) - math.lgamma(10**9 - 10**6 + 1)
    assert gamma.log10 == pytest.approx(ln / math.log(10), rel=1e-12)
    assert format_gamma(gamma) == f"{gamma:,}" == str(gamma) == "≈ 7.30 × 10^3434073"


def test_huge_trees_come_back_at_once():
    start = time.perf_counter()
    values = [tree_gamma([(10**9, 10**6)] * 3, *case) for case in CASES]
    values.append(tree_gamma([(64, 32)] * 12, "tanh", "all"))  # F ~ 32^11 nodes choose
    assert time.perf_counter() - start < 1.0
    assert all(isinstance(v, GammaEstimate) and str(v).startswith("≈ ") for v in values)
    # identity: the leaves' count is about 2^(10^9), almost every subset of the pool
    flat = tree_gamma([(10**9, 10**6)] * 2, "identity")
    assert flat.log10 == pytest.approx((10**9 + 0) * math.log10(2) + pool_gamma(10**9, 10**6).log10, rel=1e-9)


@pytest.mark.parametrize("levels,case", [
    ([(1000, 500)], ("tanh", "all")), ([(40, 20)] * 3, ("tanh", "all")),
    ([(40, 20)] * 2, ("tanh", "child_v2")), ([(40, 20)] * 3, ("tanh", "child_v2")),
    ([(900, 3)] * 2, ("identity", "all")), ([(900, 300)] * 2, ("identity", "all")),
    ([(990, 1)] * 2, ("identity", "all")),
])
def test_exact_below_the_threshold_and_the_estimate_agrees_with_it_above(levels, case):
    gamma = tree_gamma(levels, *case)
    exact = _exact(levels, *case)
    if exact < 10**EXACT_DIGITS:
        assert type(gamma) is int and gamma == exact
    else:
        assert isinstance(gamma, GammaEstimate)
        shift = max(0, exact.bit_length() - 64)
        assert gamma.log10 == pytest.approx(shift * math.log10(2) + math.log10(exact >> shift), abs=1e-6)


def _exact(levels, activation, position):
    """Exact big-integer Γ by the closed forms (only the threshold is under test here)."""
    parents, F = [], 1
    for _, f in reversed(levels):
        parents.insert(0, F)
        F *= f
    if activation == "identity":
        return math.prod(sum(math.comb(s, i) for i in range(f, min(p * f, s) + 1))
                         for (s, f), p in zip(levels, parents))
    if position == "all":
        return math.prod(math.comb(s, f) ** p for (s, f), p in zip(levels, parents))
    g = 1
    for s, f in levels:
        g = math.comb(s, f) * math.comb(g + f - 1, f)
    return g


def test_estimates_compare_print_and_pickle():
    a, b = pool_gamma(10**6, 10**5), pool_gamma(10**6, 2 * 10**5)
    assert a != b and a == pool_gamma(10**6, 10**5) and len({a, b, pool_gamma(10**6, 10**5)}) == 2
    assert a != 216 and a > 10**300 and pickle.loads(pickle.dumps(a)) == a
    assert format_gamma(216) == "216" and format_gamma(279_936) == "279,936"
    sites = mf.structural_flexibility({"sites": [_huge_pool()["sites"][0],
                                                 {"target": {"roles": ["down"]}, "adapter": {"kind": "lora"}}]})
    assert isinstance(sites, dict) and sites["sites[1]"] == 1 and isinstance(sites["sites[0]"], GammaEstimate)


def test_inspect_refuses_a_huge_pool_at_once_and_explain_prints_its_gamma(tmp_path):
    """A billion experts cannot be compiled (the size check refuses them with their numbers before
    anything is built), but their Γ is still printed as an estimate, at once."""
    from click.testing import CliRunner

    from moleforge.cli import main
    from moleforge.compiler import build_graph
    from moleforge.integrations.sites import SiteShape
    from moleforge.report.explain_text import gamma_text

    tiny("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "spec.json").write_text(json.dumps(_huge_pool()))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "spec.json"), "--model", str(tmp_path / "model")])
    assert time.perf_counter() - start < 30
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "would store 128,000,000,000 adapter parameters" in errors[0]
    graph = build_graph(mf.ExpertPool.model_validate(_huge_pool()["sites"][0]["adapter"]), SiteShape("up", 32, 64))
    assert gamma_text(graph) == "≈ 7.30 × 10^3434073 = C(1000000000,1000000) expert sets per token"
