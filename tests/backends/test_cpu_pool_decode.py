"""The decode form of a routed LoRA pool (``runtime/ops_decode.PoolDecode``, the compiled CPU
kernel ``backends/cpu/pool_decode.py``): without autograd at the kernel policy's decode sizes,
one kernel call per site equals the float64 interpreter on the site's plain IR, for every pool
whose plain IR it takes (softmax top-k renormalised or not, any temperature, the dense softmax
gate, per-expert or shared factors, aux losses and input dropout, identity in evaluation),
whatever the passes made of the generated forward. Drawn pools of every kind it
does not take get no form, and a form never runs with autograd, above the decode sizes or while
a routing log is kept. A MoLoRA Llama decodes the same tokens and logits with it as without."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import moleforge as mf
from models import assert_same_generation, decode_llama, greedy, kernel_and_torch_ops
from moleforge.backends.cpu import pool_decode
from moleforge.backends.runtime.ops_decode import decode_step
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.backends.torch_fx.lower_decode import pool_decode_form
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import DenseRouter, ExpertPool, PerExpert, Shared, SwitchLoadBalance, TopKRouter
from strategies import DROPOUTS, SCALINGS, adapters, graphs, inputs_for, lowered, make_params, pools
from tolerances import assert_close

MARGIN = 1e-7
KERNEL = KernelPolicy(triton="off", cpu="on", decode_tokens=8)
"""Every drawn input (1-6 tokens) takes the decode path, with the CPU kernel built."""


@contextmanager
def _counted():
    """The number of kernel calls in the block."""
    calls = [0]
    real = pool_decode.run

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    with mock.patch.object(pool_decode, "run", spy):
        yield calls


@st.composite
def decodable_pools(draw):
    """Pools whose plain IR the decode form takes: every option but the router's kind."""
    E = draw(st.integers(1, 6))
    if draw(st.booleans()):
        router = TopKRouter(k=draw(st.integers(1, E)), renormalize=draw(st.booleans()),
                            temperature=draw(st.sampled_from([1.0, 0.5, 2.0])))
    else:
        router = DenseRouter(temperature=draw(st.sampled_from([1.0, 2.0])))
    down, up = draw(st.sampled_from([(PerExpert(), "per_expert"), (Shared(), "per_expert"), (PerExpert(), "shared")]))
    aux = [SwitchLoadBalance(weight=0.1)] if isinstance(router, TopKRouter) and draw(st.booleans()) else []
    return ExpertPool(experts=E, rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([None, 8.0])), down=down,
                      up=up, router=router, aux_losses=aux, scaling=draw(st.sampled_from(SCALINGS)),
                      dropout=draw(st.sampled_from(DROPOUTS)))


def _lowered(graph, params, plain, policy=KERNEL):
    """``graph`` lowered with ``plain`` as its plain IR (float64, evaluation mode)."""
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for d in graph.params:
            getattr(store, d.name).copy_(params[d.name])
    return lower(graph, store, None, policy, plain=plain).eval()


@given(graph=graphs(decodable_pools()), pipeline=st.booleans(), with_acc=st.booleans(), data=st.data())
def test_the_decode_form_matches_the_interpreter(graph, pipeline, with_acc, data):
    verify(graph)
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    ref = interpret(graph, params, x)
    assume(all(m > MARGIN for m in ref.margins.values()))
    final = run_pipeline(graph, DEFAULT_PIPELINE) if pipeline else graph
    gm = _lowered(final, params, graph)
    assert gm.decode_form is not None, "a pool the decode form takes got none"
    acc = torch.randn(x.shape[0], graph.d_out, dtype=torch.float64) if with_acc else None
    with torch.no_grad(), _counted() as calls:
        y = decode_step(gm, x, acc)
    assert calls[0] == 1, "the kernel did not run"
    assert_close(y, ref.output + (0 if acc is None else acc))

@given(graph=graphs(st.one_of(pools(), adapters())), data=st.data())
def test_any_adapter_with_a_form_decodes_as_the_interpreter(graph, data):
    """Drawn pools of every kind (shared experts, capacity, DoRA, ranks per expert, every router)
    and drawn adapters of every kind: those that get a form are computed right by it, those that
    do not run their forward."""
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    gm = lowered(graph, params, policy=KERNEL)
    if pool_decode_form(graph) is None:
        with torch.no_grad():
            assert decode_step(gm, x, None) is None
        return
    ref = interpret(graph, params, x)
    assume(all(m > MARGIN for m in ref.margins.values()))
    with torch.no_grad():
        assert_close(decode_step(gm, x, None), ref.output)


def test_no_form_with_autograd_above_the_decode_sizes_or_on_other_graphs():
    graph = build_graph(mf.presets.load("molora").sites[0].adapter, SiteShape(label="site", d_in=6, d_out=5))
    params = make_params(graph, 0)
    gm = lowered(graph, params, policy=KernelPolicy(triton="off", cpu="on", decode_tokens=2))
    small, large = (torch.randn(T, graph.d_in, dtype=torch.float64) for T in (2, 3))
    with _counted() as calls:
        assert decode_step(gm, small, None) is None  # autograd on
        with torch.no_grad():
            assert decode_step(gm, large, None) is None
            assert decode_step(gm, small, None) is not None
    assert calls[0] == 1
    off = lowered(graph, params, policy=KernelPolicy(triton="off", cpu="off"))
    with torch.no_grad():
        assert decode_step(off, small, None) is None
    smore = build_graph(mf.presets.load("smore").sites[0].adapter, SiteShape(label="site", d_in=6, d_out=5))
    assert pool_decode_form(smore) is None


@pytest.mark.parametrize("preset", ["molora", "hydralora"])
def test_a_llama_decodes_the_same_tokens_and_logits_with_the_form(preset):
    spec = mf.presets.load(preset).with_init(mf.Init(up="normal", std=0.05, seed=0))
    with_kernel, without = kernel_and_torch_ops(spec, KERNEL)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with _counted() as calls:
        a = greedy(with_kernel, ids)
    assert calls[0] > 0
    assert_same_generation(a, greedy(without, ids))


def test_a_routing_log_runs_the_generated_forward():
    model = decode_llama()
    handle = mf.compile(mf.presets.load("molora"), model, policy=KERNEL)
    ids = torch.randint(0, 128, (1, 3))
    with torch.no_grad(), _counted() as calls, handle.record_routing() as log:
        model(ids)
    assert calls[0] == 0 and len(log.entries) == 14


def test_the_kernel_names_a_bad_shape():
    KernelPolicy(cpu="on").with_cpu_build()
    x = torch.randn(1, 4)
    with pytest.raises(RuntimeError, match="pool_decode: the factors' widths do not match x"):
        pool_decode.run(x, torch.randn(3, 4), torch.randn(3, 2, 5), torch.randn(3, 2, 6), None, "softmax_topk",
                        2, True, 1.0, 1.0)
