"""The decode path equals the float64 interpreter: sparse pools as one dense GEMM at the kernel
policy's decode sizes (outputs and gradients), packed weights kept between forwards without
autograd (and rebuilt when a weight changes), and no aux loss in evaluation mode without
autograd unless the module asks for it."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.ir import GroupedMix, interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, group_pools, run_pipeline, stack_pools
from strategies import (
    adapters,
    frozen_inputs,
    graphs,
    inputs_for,
    lowered,
    make_params,
    pools,
    rank_partitions,
    samples_for,
)
from tolerances import assert_close

MARGIN = 1e-7
DECODE = KernelPolicy(triton="off", cpu="off", decode_tokens=8)
"""Every drawn input (1-6 tokens) takes the decode path."""
TRAIN = KernelPolicy(triton="off", cpu="off", decode_tokens=0)


def _probe(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)


def _reference(graph, params, x, trainable):
    leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
    x_leaf = x.clone().requires_grad_(True)
    out = interpret(graph, {**params, **leaves}, x_leaf)
    loss = (out.output * _probe(out.output)).sum() + (out.aux_total if graph.aux else 0.0)
    loss.backward()
    return out, x_leaf.grad, {k: v.grad for k, v in leaves.items()}


@given(graph=graphs(st.one_of(pools(), rank_partitions())), data=st.data())
def test_grouped_pools_on_the_decode_path_match_the_interpreter(graph, data):
    graph = group_pools(graph)
    verify(graph)
    assume(any(isinstance(n, GroupedMix) for n in graph.nodes))
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    trainable = [d.name for d in graph.params if d.trainable]
    ref, gx_ref, g_ref = _reference(graph, params, x, trainable)
    assume(all(m > MARGIN for m in ref.margins.values()))
    gm = lowered(graph, params, policy=DECODE)
    x_leaf = x.clone().requires_grad_(True)
    y, aux, _ = gm(x_leaf)
    ((y * _probe(y)).sum() + (aux if aux is not None else 0.0)).backward()
    assert_close(y.detach(), ref.output)
    assert_close(x_leaf.grad, gx_ref, msg="grad of x")
    for k in trainable:
        zeros = torch.zeros_like(params[k])
        got, want = getattr(gm, k).grad, g_ref[k]
        assert_close(zeros if got is None else got, zeros if want is None else want, msg=f"grad of {k}")
    with torch.no_grad():
        y_nograd = gm(x)[0]
    assert_close(y_nograd, ref.output)
    grouped = [n.id for n in graph.nodes if isinstance(n, GroupedMix)]
    assert all(g in gm.pack_cache._entries for g in grouped), "the dense decode form did not run"


def _optimised(graph, how: str):
    if how == "pipeline":
        return run_pipeline(graph, DEFAULT_PIPELINE)
    return stack_pools(graph) if how == "stacked" else graph


@given(graph=graphs(), how=st.sampled_from(["plain", "stacked", "pipeline"]), data=st.data())
def test_packed_weights_follow_every_weight_change(graph, how, data):
    """Without autograd the module keeps its packed weights (fused down-projections, block
    columns, tree tables); after an in-place update and after a replaced tensor it equals the
    interpreter on the new weights."""
    graph = _optimised(graph, how)
    verify(graph)
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    samples = data.draw(samples_for(x.shape[0]))
    gm = lowered(graph, params, policy=data.draw(st.sampled_from([DECODE, TRAIN])))
    ref = interpret(graph, params, x, samples=samples)
    assume(all(m > MARGIN for m in ref.margins.values()))
    with torch.no_grad():
        first, second = (gm(x, samples, **frozen_inputs(graph, params))[0] for _ in range(2))
    assert_close(first, ref.output)
    assert torch.equal(first, second)
    if len(gm.pack_cache):
        assert gm.pack_cache.hits > 0, "the second forward rebuilt its packed weights"
    new = make_params(graph, data.draw(st.integers(0, 2**16)))
    names = [d.name for d in graph.params]
    replaced = data.draw(st.sampled_from(names))
    with torch.no_grad():
        for name in names:
            t = getattr(gm, name)
            if name == replaced:
                t.data = new[name].clone()
            else:
                t.copy_(new[name])
    ref_new = interpret(graph, new, x, samples=samples)
    assume(all(m > MARGIN for m in ref_new.margins.values()))
    with torch.no_grad():
        after = gm(x, samples, **frozen_inputs(graph, new))[0]
    assert_close(after, ref_new.output)


@given(graph=graphs(adapters()), data=st.data())
def test_no_aux_loss_in_evaluation_without_autograd_unless_asked(graph, data):
    verify(graph)
    assume(graph.aux)
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    samples = data.draw(samples_for(x.shape[0]))
    ref = interpret(graph, params, x, samples=samples)
    assume(all(m > MARGIN for m in ref.margins.values()))
    gm = lowered(graph, params, policy=DECODE)
    frozen = frozen_inputs(graph, params)
    with torch.no_grad():
        y, aux, _ = gm(x, samples, **frozen)
    assert aux is None
    assert_close(y, ref.output)
    gm.eval_aux = True
    with torch.no_grad():
        asked = gm(x, samples, **frozen)[1]
    assert_close(asked, ref.aux_total)
    gm.eval_aux = False
    assert_close(gm(x, samples, **frozen)[1].detach(), ref.aux_total)  # autograd on: computed
