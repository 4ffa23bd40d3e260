"""FFN-block experts (``scope: "ffn_block"``), the lowering: the lowered ops, node by node and
fused, with and without the block rewrites (tested in ``tests/passes``), match the interpreter
and each other."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import assert_close
from ffn_block_helpers import F64, REWRITES, block_graphs, block_inputs, block_params, cpu_policy, interpret_grads
from moleforge.backends.runtime import ops_block, ops_linear
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.integrations.ffn_trace import ACTIVATION_NAMES

# ---- lowering against the interpreter ----------------------------------------------------------

LOWERED_FORMS = ["none", "share_frozen_projections", "hoist_frozen_down", "both"]


@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6),
       rewrite=st.sampled_from(LOWERED_FORMS), kernel=st.sampled_from(["0", "1"]))
def test_lowered_block_matches_interpreter(graph, seed, T, rewrite, kernel):
    """With the CPU kernel for fused blocks on (``"1"``) and off."""
    g = graph if rewrite == "none" else REWRITES[rewrite](graph)
    params, x = block_params(g, seed), block_inputs(g, seed, T)
    w = torch.randn(T, g.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    ref, ref_grads = interpret_grads(g, params, x, w)
    assume(all(m > 1e-6 for m in ref.margins.values()))
    store = ParamStore(g.params, dtype=F64)
    with torch.no_grad():
        for d in g.params:
            getattr(store, d.name).copy_(params[d.name])
    gm = lower(g, store, policy=cpu_policy(kernel)).eval()
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
    """``routed_ffn`` (its torch form, in runs of ``chunk`` values) against ``expert_hidden`` +
    ``expert_sum`` + ``expert_lora``: outputs and every gradient."""
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
    down_a, down_b = (rand(E, r, F), rand(E, d, r)) if lora else (None, None)
    w_y, w_z = torch.randn(T, F, generator=gen, dtype=F64), torch.randn(T, d, generator=gen, dtype=F64)

    def run(fused: bool):
        plan = ops_block.slot_plan(gates, index)
        base_u, base_g = x @ W_u.T, x @ W_g.T
        if fused:
            y, z = ops_block.routed_ffn(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation,
                                        down_a, down_b, 2.0, chunk)  # the default policy: torch ops
        else:
            h = ops_block.expert_hidden(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation)
            y = ops_block.expert_sum(h, plan)
            z = ops_block.expert_lora(h, plan, down_a, down_b, 2.0) if lora else None
        loss = (y * w_y).sum() + ((z * w_z).sum() if lora else 0.0)
        leaves = (x, gates, W_u, *lin_u[2:4], *(lin_g[2:4] if gated else ()), down_a, down_b)
        leaves = [t for t in leaves if t is not None]
        return [y, *([z] if lora else [])], torch.autograd.grad(loss, leaves, allow_unused=True)

    (outs, grads), (ref_outs, ref_grads) = run(True), run(False)
    for got, want in zip(outs + list(grads), ref_outs + list(ref_grads), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want)
