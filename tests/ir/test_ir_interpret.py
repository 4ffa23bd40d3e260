"""Closed forms the interpreter must reproduce, computed by hand."""

from __future__ import annotations

import math

import torch

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import interpret
from moleforge.specs import (
    DenseRouter,
    ExpertPool,
    LocalizedBalance,
    LoRA,
    ResidualTree,
    Shared,
    SwitchLoadBalance,
    TopKRouter,
    TreeLevel,
    TreeRouter,
)
from strategies import make_params
from tolerances import assert_close

X = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_single_lora_is_scaled_ba():
    g = build_graph(LoRA(rank=3, alpha=12.0), SiteShape("s", 6, 4))
    p = make_params(g, 1)
    assert_close(interpret(g, p, X).output, 4.0 * (X @ p["A"].T) @ p["B"].T)


def test_rslora_scale():
    g = build_graph(LoRA(rank=4, alpha=8.0, scaling="rslora"), SiteShape("s", 6, 4))
    p = make_params(g, 2)
    assert_close(interpret(g, p, X).output, 4.0 * (X @ p["A"].T) @ p["B"].T)


def test_dense_pool_is_softmax_weighted_sum():
    g = build_graph(ExpertPool(experts=3, rank=2, alpha=4.0, router=DenseRouter()), SiteShape("s", 6, 4))
    p = make_params(g, 3)
    w = torch.softmax(X @ p["router_w"].T, 1)
    want = sum(w[:, i:i + 1] * 2.0 * (X @ p["A"][i].T) @ p["B"][i].T for i in range(3))
    assert_close(interpret(g, p, X).output, want)


def test_topk_pool_and_switch_loss():
    spec = ExpertPool(experts=4, rank=2, router=TopKRouter(k=2), aux_losses=[SwitchLoadBalance(weight=0.5)])
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 4)
    r = interpret(g, p, X)
    probs = torch.softmax(X @ p["router_w"].T, 1)
    top = probs.topk(2, dim=1)
    want = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(5):
        gates = top.values[t] / top.values[t].sum()
        for j in range(2):
            e = int(top.indices[t, j])
            want[t] += gates[j] * (X[t] @ p["A"][e].T) @ p["B"][e].T
    assert_close(r.output, want)
    counts = torch.bincount(top.indices.reshape(-1), minlength=4).double()
    assert_close(r.aux["aux0"], 0.5 * 4 * torch.sum(counts / 5 * probs.mean(0)))


def test_jitter_scales_the_router_input_in_training_only():
    """A top-3-of-3 router (softmax weights) with jitter ε = 0.5: ``noise = {"jitter": (u,)}`` scales its input by
    ``1 - ε + 2ε·u`` (training); without it the jitter is the identity (evaluation)."""
    spec = ExpertPool(experts=3, rank=2, alpha=2.0, router=TopKRouter(k=3, jitter=0.5))
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 5)
    u = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def pool(x_router):
        w = torch.softmax(x_router @ p["router_w"].T, 1)
        return sum(w[:, i:i + 1] * (X @ p["A"][i].T) @ p["B"][i].T for i in range(3))

    assert_close(interpret(g, p, X).output, pool(X))
    assert_close(interpret(g, p, X, noise={"jitter": (u,)}).output, pool(X * (0.5 + u)))


def test_shared_down_projection_hydralora():
    g = build_graph(ExpertPool(experts=3, rank=2, down=Shared(), router=DenseRouter()), SiteShape("s", 6, 4))
    p = make_params(g, 5)
    assert p["A"].shape == (1, 2, 6)
    w = torch.softmax(X @ p["router_w"].T, 1)
    h = X @ p["A"][0].T
    want = sum(w[:, i:i + 1] * h @ p["B"][i].T for i in range(3))
    assert_close(interpret(g, p, X).output, want)


def test_one_level_tree_single_expert():
    # L = 1, one expert, fanout 1, paper conventions: weight 1, y = Wp σ(c(B(Ax + a) + b)) + bp
    spec = ResidualTree(levels=[TreeLevel(experts=1, rank=2, fanout=1, alpha=4.0)],
                        router=TreeRouter(gate="switch", down_dim=3, key_dim=2))
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 6)
    u = 2.0 * ((X @ p["A0"][0].T + p["A0_bias"][0]) @ p["B0"][0].T + p["B0_bias"][0])
    want = torch.tanh(u) @ p["proj_w"].T + p["proj_b"]
    assert_close(interpret(g, p, X).output, want)


def test_two_level_tree_by_hand():
    spec = ResidualTree(levels=[TreeLevel(experts=2, rank=1, fanout=1), TreeLevel(experts=2, rank=1, fanout=1)],
                        router=TreeRouter(gate="switch", down_dim=3, key_dim=2), activation="relu",
                        conventions="official")
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 7)
    r = interpret(g, p, X)
    idx, wts = r.values["route"].indices, r.values["route"].weights
    relu = torch.relu
    for t in range(5):
        x = X[t]
        xd = p["down_w"] @ x + p["down_b"]

        def query(l, z):
            return p[f"query{l}_w2"] @ relu(p[f"query{l}_w1"] @ z + p[f"query{l}_b1"]) + p[f"query{l}_b2"]

        p1 = torch.softmax(p["keys1"] @ query(1, xd), 0)
        e1 = int(torch.argmax(p1))
        z0 = torch.cat([xd, p["keys1"][e1]])
        p0 = torch.softmax(p["keys0"] @ query(0, z0), 0)
        e0 = int(torch.argmax(p0))
        assert int(idx[1][t, 0, 0]) == e1 and int(idx[0][t, 0, 0]) == e0
        leaf = p0[e0] * relu(p["B0"][e0] @ (p["A0"][e0] @ x + p["A0_bias"][e0]) + p["B0_bias"][e0])
        u1 = p["B1"][e1] @ (p["A1"][e1] @ x + p["A1_bias"][e1]) + p["B1_bias"][e1]
        root = p1[e1] * relu(u1 + p["W1"] @ leaf + p["W1_bias"])
        assert_close(r.output[t], p["proj_w"] @ root + p["proj_b"])
        assert math.isclose(float(wts[1][t, 0, 0]), float(p1[e1]), rel_tol=1e-12)


def test_fixed_routing_overrides_selection():
    g = build_graph(ExpertPool(experts=4, rank=2, router=TopKRouter(k=1)), SiteShape("s", 6, 4))
    p = make_params(g, 8)
    forced = torch.full((5, 1), 3)
    r = interpret(g, p, X, routing={"route": forced})
    probs = torch.softmax(X @ p["router_w"].T, 1)
    want = (X @ p["A"][3].T) @ p["B"][3].T  # k = 1, renormalised weight 1
    assert_close(r.output, want)
    assert torch.equal(r.routes["route"], forced)
    assert r.margins["route"] == math.inf and probs.shape == (5, 4)


def test_localized_balance_counts_the_samples_present_wherever_they_sit():
    """Tokens of batch row 1 alone (row 0 was padding) give the loss of the same tokens as row 0:
    the samples are those that hold a token, not ``max(index) + 1``."""
    spec = ExpertPool(experts=4, rank=2, router=DenseRouter(), aux_losses=[LocalizedBalance(weight=1.0, delta=0.2)])
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 6)
    for types in (None, torch.tensor([1] * 5)):
        first = interpret(g, p, X, samples=(torch.zeros(5, dtype=torch.long), types)).aux
        second = interpret(g, p, X, samples=(torch.ones(5, dtype=torch.long), types)).aux
        assert first.keys() == second.keys() and first
        for k in first:
            assert_close(second[k], first[k])
    rows = (torch.tensor([0, 0, 2, 2, 2]), torch.tensor([0, 0, 1, 1, 1]))  # rows 0 and 2 of three
    assert_close(interpret(g, p, X, samples=(rows[0], None)).aux[g.aux[0]],
                 interpret(g, p, X, samples=(rows[1], None)).aux[g.aux[0]])
