"""Closed forms of input dropout, expert capacity, the router z-loss, shared-expert groups and
pools of experts with their own ranks, FFN-block experts' LoRA dropout, computed by hand against the
interpreter; and the runtime
ops of capacity and ragged pools on cases where the answer is known."""

from __future__ import annotations

import math

import torch

from ffn_block_helpers import block_params
from moleforge.backends.runtime import ops_basics
from moleforge.compiler.build import SiteShape, build_block_graph, build_graph
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import Routing, interpret
from moleforge.ir.interpret_basics import capacity_keep
from moleforge.specs import DenseRouter, ExpertPool, LoRA, RouterZLoss, SharedExperts, TopKRouter
from strategies import make_params
from tolerances import assert_close

F64 = torch.float64
X = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_dropout_is_the_identity_in_evaluation_and_drops_a_b_input_in_training():
    g = build_graph(LoRA(rank=3, alpha=6.0, dropout=0.25), SiteShape("s", 6, 4))
    p = make_params(g, 1)
    assert_close(interpret(g, p, X).output, 2.0 * (X @ p["A"].T) @ p["B"].T)
    u = torch.rand(5, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    kept = X * (u >= 0.25).to(F64) / 0.75
    out = interpret(g, p, X, noise={"drop": (u,)}).output
    assert_close(out, 2.0 * (kept @ p["A"].T) @ p["B"].T)
    assert not torch.allclose(out, interpret(g, p, X).output), "the draw drops some features"


def test_pool_dropout_leaves_the_router_on_x():
    spec = ExpertPool(experts=3, rank=2, router=DenseRouter(), dropout=0.5)
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 3)
    u = torch.rand(5, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    kept = X * (u >= 0.5).to(F64) * 2.0
    w = torch.softmax(X @ p["router_w"].T, 1)  # the router reads the undropped input
    want = sum(w[:, i:i + 1] * (kept @ p["A"][i].T) @ p["B"][i].T for i in range(3))
    assert_close(interpret(g, p, X, noise={"drop": (u,)}).output, want)


def test_capacity_keeps_first_choices_first_then_token_order():
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # T = 4, k = 2, E = 3
    # factor 0.75: C = ceil(0.75 · 4 · 2 / 3) = 2. First choices: tokens 0, 1 take expert 0, token 2
    # is over; token 3 takes expert 1. Second choices: token 0 takes expert 1 (its 2nd), token 1
    # expert 2, token 2 finds expert 1 full, token 3 finds expert 0 full.
    keep = capacity_keep(index, 3, 0.75)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    gates = torch.rand(4, 3, dtype=F64)
    gates = torch.zeros_like(gates).scatter(1, index, gates.gather(1, index))
    got = ops_basics.capacity_limit(Routing(gates, gates, index), 0.75)
    assert torch.equal(got.dropped, ~keep)
    assert torch.equal(got.gates.gather(1, index), gates.gather(1, index) * keep)


def test_capacity_in_a_pool_passes_dropped_tokens_by():
    spec = ExpertPool(experts=2, rank=2, router=TopKRouter(k=1), capacity_factor=0.5)
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 5)
    r = interpret(g, p, X)
    probs = torch.softmax(X @ p["router_w"].T, 1)
    top = probs.argmax(1)
    cap, used, want = math.ceil(0.5 * 5 / 2), [0, 0], torch.zeros(5, 4, dtype=F64)
    for t in range(5):
        e = int(top[t])
        if used[e] < cap:
            used[e] += 1
            want[t] = (X[t] @ p["A"][e].T) @ p["B"][e].T
    assert_close(r.output, want)
    assert int(r.values["capacity"].dropped.sum()) == 5 - sum(used) > 0


def test_z_loss_is_the_mean_squared_log_partition():
    spec = ExpertPool(experts=4, rank=2, router=TopKRouter(k=2), aux_losses=[RouterZLoss(weight=0.5)])
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 6)
    z = X @ p["router_w"].T
    want = 0.5 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in z.tolist()) / 5
    assert_close(interpret(g, p, X).aux_total, torch.tensor(want, dtype=F64))


def test_shared_expert_group_adds_every_expert_with_gate_one():
    spec = ExpertPool(experts=2, rank=2, router=DenseRouter(), shared_expert=SharedExperts(count=3, rank=2, alpha=4.0))
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 7)
    w = torch.softmax(X @ p["router_w"].T, 1)
    routed = sum(w[:, i:i + 1] * (X @ p["A"][i].T) @ p["B"][i].T for i in range(2))
    shared = sum(2.0 * (X @ p[f"shared{j}_A"].T) @ p[f"shared{j}_B"].T for j in range(3))
    assert_close(interpret(g, p, X).output, routed + shared)


def test_ragged_pool_is_a_sum_of_loras_of_their_own_rank_and_scale():
    spec = ExpertPool(experts=3, ranks=[1, 2, 4], alpha=4.0, scaling="rslora", router=DenseRouter())
    g = build_graph(spec, SiteShape("s", 6, 4))
    p = make_params(g, 8)
    w = torch.softmax(X @ p["router_w"].T, 1)
    A, B, o = p["A"], p["B"], [0, 1, 3, 7]
    want = sum(w[:, i:i + 1] * (4.0 / math.sqrt(r)) * (X @ A[o[i]:o[i + 1]].T) @ B[:, o[i]:o[i + 1]].T
               for i, r in enumerate([1, 2, 4]))
    assert_close(interpret(g, p, X).output, want)


def test_ragged_mix_op_sparse_equals_dense_on_the_same_gates():
    gen = torch.Generator().manual_seed(9)
    x, a, b = (torch.randn(s, dtype=F64, generator=gen) for s in ((6, 5), (7, 5), (3, 7)))
    index = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]])
    gates = torch.zeros(6, 3, dtype=F64).scatter(1, index, torch.rand(6, 2, dtype=F64, generator=gen))
    ranks, scales = (1, 2, 4), (1.0, 0.5, 0.25)
    sparse = ops_basics.ragged_mix(x, gates, index, a, b, ranks, scales)
    assert_close(sparse, ops_basics.ragged_mix(x, gates, None, a, b, ranks, scales))


def test_dora_is_the_magnitude_times_the_normalised_adapted_weight():
    g = build_graph(LoRA(rank=3, alpha=6.0, magnitude=True), SiteShape("s", 6, 4))
    p = make_params(g, 10)  # W (4, 6) drawn too: a frozen input
    W, A, B = p["W"], p["A"], p["B"]
    V = W + 2.0 * B @ A  # (4, 6)
    m = torch.linalg.vector_norm(W, dim=1) + p["magnitude"]
    adapted = m[:, None] * V / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    assert_close(interpret(g, p, X).output, X @ adapted.T - X @ W.T)


def test_block_dropout_drops_each_expert_loras_own_input_per_slot():
    """MixLoRA's lora_dropout on a gated block, top-1 of two experts, by hand: token t's expert e
    reads ``x ⊙ m_g`` in its gate LoRA, ``x ⊙ m_u`` in its up LoRA and ``h ⊙ m_d`` in its down LoRA
    (``m = [ν >= p] / (1 - p)`` of the slot's draws); the frozen projections and the router read the
    undropped values; without noise (evaluation) nothing is dropped."""
    lin = {role: BlockLinear(role, role, *dims, False, False)
           for role, dims in {"gate": (3, 4), "up": (3, 4), "down": (4, 2)}.items()}
    pool = ExpertPool(experts=2, rank=2, alpha=4.0, router=TopKRouter(k=1), dropout=0.4)
    g = build_block_graph(pool, lin, "silu", ["down", "gate", "up"], SiteShape(label="b", d_in=3, d_out=2))
    p = block_params(g, 5)
    x = X[:, :3]
    gen = torch.Generator().manual_seed(6)
    nu = tuple(torch.rand(5, 1, w, generator=gen, dtype=F64) for w in (3, 3, 4))  # gate, up, down
    m_g, m_u, m_d = ((v[:, 0] >= 0.4).to(F64) / 0.6 for v in nu)
    res, clean = interpret(g, p, x, noise={"experts": nu}), interpret(g, p, x)
    assert torch.equal(res.routes["route"], clean.routes["route"]), "the router reads the undropped x"
    s = 2.0  # alpha / r

    def lora(role: str, e: int, u):
        return s * (u @ p[f"A_{role}"][e].T) @ p[f"B_{role}"][e].T

    want, plain = torch.empty(5, 2, dtype=F64), torch.empty(5, 2, dtype=F64)
    for t, e in enumerate(res.routes["route"][:, 0].tolist()):
        xt = x[t:t + 1]
        for out, (mg, mu, md) in ((want, (m_g[t], m_u[t], m_d[t])), (plain, (1.0, 1.0, 1.0))):
            gate = xt @ p["W_gate"].T + lora("gate", e, xt * mg)
            h = torch.nn.functional.silu(gate) * (xt @ p["W_up"].T + lora("up", e, xt * mu))
            out[t] = (h @ p["W_down"].T + lora("down", e, h * md))[0]
    assert_close(res.output, want)
    assert_close(clean.output, plain)
    assert not torch.allclose(want, plain), "the draws drop some features"
