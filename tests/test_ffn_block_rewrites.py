"""FFN-block experts (``scope: "ffn_block"``), the compiler side: the block rewrites are
identities of the interpreter (outputs and gradients), and the lowered ops, node by node and
fused, match the interpreter and each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import assert_close
from moleforge.backends.torch_fx import ops_block, ops_linear
from moleforge.backends.torch_fx.ffn_block import ACTIVATION_NAMES, BlockLinear
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape
from moleforge.compiler.ffn_sites import build_block_graph
from moleforge.ir import Graph, interpret, print_graph, verify
from moleforge.passes.hoist_frozen_down import hoist_frozen_down
from moleforge.passes.share_frozen_projections import share_frozen_projections
from moleforge.specs import DenseRouter, ExpertPool, SwitchLoadBalance, TopKRouter
from strategies import make_params

F64 = torch.float64


# ---- strategies ---------------------------------------------------------------------------

@st.composite
def block_graphs(draw) -> Graph:
    """Plain IR of random FFN blocks: gated or not, any activation, biases, a router (top-k with
    or without renormalisation, or dense), experts on a random non-empty subset of linears."""
    d, d_ff, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 6))
    E = draw(st.integers(1, 4))
    linears = {"up": BlockLinear("up", "up", d, d_ff, draw(st.booleans()), False),
               "down": BlockLinear("down", "down", d_ff, d_out, draw(st.booleans()), False)}
    if draw(st.booleans()):
        linears["gate"] = BlockLinear("gate", "gate", d, d_ff, draw(st.booleans()), False)
    roles = draw(st.sets(st.sampled_from(sorted(linears)), min_size=1))
    if draw(st.booleans()):
        router = TopKRouter(k=draw(st.integers(1, E)), renormalize=draw(st.booleans()))
        aux = [SwitchLoadBalance(weight=0.1)] if draw(st.booleans()) else []
    else:
        router, aux = DenseRouter(), []
    pool = ExpertPool(experts=E, rank=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([None, 4.0])),
                      scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])), router=router,
                      aux_losses=aux)
    graph = build_block_graph(pool, linears, draw(st.sampled_from(ACTIVATION_NAMES)), sorted(roles),
                              SiteShape(label="block", d_in=d, d_out=d_out))
    return verify(graph)


def block_params(graph: Graph, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    """Every stored tensor random (non-zero B) plus random frozen block weights."""
    params = make_params(graph, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    for d in graph.frozen:
        params[d.name] = torch.randn(d.shape, generator=gen, dtype=dtype) * 0.6
    return params


def _inputs(graph: Graph, seed: int, T: int) -> torch.Tensor:
    return torch.randn(T, graph.d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _interpret_grads(graph: Graph, params, x, w, routing=None):
    """Output, aux and the gradients of ``Σ out ⊙ w + aux`` wrt x and the stored tensors."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    xl = x.clone().requires_grad_(True)
    res = interpret(graph, leaves, xl, routing=routing)
    loss = (res.output * w).sum() + res.aux_total
    names = [d.name for d in graph.params]
    grads = torch.autograd.grad(loss, [xl] + [leaves[n] for n in names], allow_unused=True)
    return res, dict(zip(["x"] + names, grads, strict=True))


def _fixed(res) -> dict:
    return {rid: idx for rid, idx in res.routes.items() if idx is not None}


# ---- the rewrites are identities ---------------------------------------------------------------

REWRITES = {"share_frozen_projections": share_frozen_projections, "hoist_frozen_down": hoist_frozen_down,
            "both": lambda g: hoist_frozen_down(share_frozen_projections(g))}


@pytest.mark.parametrize("name", sorted(REWRITES))
@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_rewrite_keeps_outputs_and_gradients(name, graph, seed, T):
    rewrite = REWRITES[name]
    before = print_graph(graph)
    out = verify(rewrite(graph))
    assert print_graph(graph) == before, "the rewrite mutated its input"
    assert rewrite(out) == out, "the rewrite is not idempotent"
    params, x = block_params(graph, seed), _inputs(graph, seed, T)
    w = torch.randn(T, graph.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    ref, ref_grads = _interpret_grads(graph, params, x, w)
    got, got_grads = _interpret_grads(out, params, x, w, routing=_fixed(ref))
    assert_close(got.output, ref.output)
    assert_close(got.aux_total, ref.aux_total)
    for k, g in ref_grads.items():
        if g is not None:
            assert_close(got_grads[k], g, msg=f"gradient of {k}")


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


# ---- lowering against the interpreter ----------------------------------------------------------

LOWERED_FORMS = ["none", "share_frozen_projections", "hoist_frozen_down", "both"]


@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6),
       rewrite=st.sampled_from(LOWERED_FORMS))
def test_lowered_block_matches_interpreter(graph, seed, T, rewrite):
    g = graph if rewrite == "none" else REWRITES[rewrite](graph)
    params, x = block_params(g, seed), _inputs(g, seed, T)
    w = torch.randn(T, g.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    ref, ref_grads = _interpret_grads(g, params, x, w)
    assume(all(m > 1e-6 for m in ref.margins.values()))
    store = ParamStore(g.params, dtype=F64)
    with torch.no_grad():
        for d in g.params:
            getattr(store, d.name).copy_(params[d.name])
    gm = lower(g, store)
    xl = x.clone().requires_grad_(True)
    out, aux, _ = gm(xl, None, {d.name: params[d.name] for d in g.frozen})
    assert_close(out, ref.output)
    loss = (out * w).sum() + (aux if aux is not None else 0.0)
    names = [d.name for d in g.params if d.trainable]
    grads = torch.autograd.grad(loss, [xl] + [getattr(gm, n) for n in names], allow_unused=True)
    for name, got in zip(["x"] + names, grads, strict=True):
        want = ref_grads[name]
        assert_close(got if got is not None else torch.zeros_like(want), want, msg=f"gradient of {name}")


@given(T=st.integers(1, 40), d_in=st.integers(1, 40), d_out=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_narrow_linear_matches_linear(T, d_in, d_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(T, d_in, generator=gen, dtype=F64), torch.randn(d_out, d_in, generator=gen, dtype=F64)
    b = torch.randn(d_out, generator=gen, dtype=F64) if bias else None
    gy = torch.randn(T, d_out, generator=gen, dtype=F64)
    results = []
    for fn in (ops_linear.linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
        y = fn(*leaves) if bias else fn(*leaves, None)
        results.append((y, *torch.autograd.grad(y, leaves, gy)))
    for got, want in zip(*results, strict=True):
        assert_close(got, want)


# ---- fused experts against the node-by-node ops -----------------------------------------------

@given(seed=st.integers(0, 2**16), T=st.integers(1, 9), E=st.integers(1, 4), gated=st.booleans(),
       lora=st.booleans(), chunk=st.sampled_from([1, 7, 40, 1 << 20]),
       activation=st.sampled_from(ACTIVATION_NAMES))
def test_fused_experts_match_the_node_by_node_ops(seed, T, E, gated, lora, chunk, activation):
    """``routed_ffn`` (in runs of ``chunk`` values) against ``expert_hidden`` + ``expert_sum`` +
    ``expert_lora_down``: outputs and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    d, F, r = 3, 5, 2

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=F64) * 0.7).requires_grad_(True)

    k = min(2, E)
    scores = torch.randn(T, E, generator=gen, dtype=F64)
    index = scores.topk(k, dim=1).indices
    gates = rand(T, E)
    x, W_u, W_g = rand(T, d), rand(F, d), rand(F, d)
    lin_u = (W_u, None, rand(E, r, d), rand(E, F, r), 1.5)
    lin_g = (W_g, None, rand(E, r, d), rand(E, F, r), 0.5) if gated else None
    down_a = rand(E, r, F) if lora else None
    w_y, w_z = torch.randn(T, F, generator=gen, dtype=F64), torch.randn(T * k, r, generator=gen, dtype=F64)

    def run(fused: bool):
        plan = ops_block.slot_plan(gates, index)
        base_u, base_g = x @ W_u.T, x @ W_g.T
        if fused:
            y, z = ops_block.routed_ffn(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation,
                                        down_a, chunk)
        else:
            h = ops_block.expert_hidden(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation)
            y = ops_block.expert_sum(h, plan)
            z = ops_block.expert_lora_down(h, plan, down_a) if lora else None
        loss = (y * w_y).sum() + ((z * w_z).sum() if lora else 0.0)
        leaves = (x, gates, W_u, *lin_u[2:4], *(lin_g[2:4] if gated else ()), down_a)
        leaves = [t for t in leaves if t is not None]
        return [y, *([z] if lora else [])], torch.autograd.grad(loss, leaves, allow_unused=True)

    (outs, grads), (ref_outs, ref_grads) = run(True), run(False)
    for got, want in zip(outs + list(grads), ref_outs + list(ref_grads), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want)
