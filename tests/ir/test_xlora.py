"""X-LoRA sites (the ``xlora`` router: the site's scalings as an input of the graph, PEFT's
top-k and softmax over the kept scalings, the global weight): the interpreter on a case worked by
hand, the errors, the verifier's rules, and the hypothesis property: the lowered module, before
and after the default pipeline, gives the interpreter's outputs and gradients (of the input, the
trainable tensors and the scalings)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import InputError, IRVerificationError
from moleforge.ir import Graph, interpret, nodes, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import ExpertPool, XLoRARouter
from strategies import lowered, make_params
from tolerances import assert_close

MARGIN = 1e-7
F64 = torch.float64


def _graph(experts=3, rank=2, d_in=4, d_out=5, **router) -> Graph:
    pool = ExpertPool(experts=experts, rank=rank, router=XLoRARouter(**router), frozen_experts=True)
    return verify(build_graph(pool, SiteShape("s", d_in, d_out)))


def test_top_k_softmax_over_the_kept_and_the_global_weight_by_hand():
    g = _graph(top_k=2, softmax_topk=True, global_scaling_weight=2.0)
    p = make_params(g, 0)
    x = torch.randn(2, 4, dtype=F64)
    s = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]], dtype=F64)
    res = interpret(g, p, x, scalings=s)
    e = math.exp
    want_g = 2.0 * torch.tensor([[e(0.5) / (e(0.5) + e(0.3)), 0.0, e(0.3) / (e(0.5) + e(0.3))],
                                 [0.0, e(0.6) / (e(0.6) + e(0.3)), e(0.3) / (e(0.6) + e(0.3))]], dtype=F64)
    assert_close(res.values["route"].gates, want_g)
    scale = 1.0  # alpha None: alpha/r with alpha = r
    want = sum(want_g[:, i:i + 1] * scale * ((x @ p["A"][i].T) @ p["B"][i].T) for i in range(3))
    assert_close(res.output, want)


def test_dense_scalings_mix_every_expert():
    g = _graph()
    p = make_params(g, 1)
    x = torch.randn(3, 4, dtype=F64)
    s = torch.softmax(torch.randn(3, 3, dtype=F64), 1)
    res = interpret(g, p, x, scalings=s)
    assert_close(res.values["route"].gates, s)


def test_missing_or_misshapen_scalings_are_input_errors():
    g = _graph()
    p, x = make_params(g, 0), torch.randn(2, 4, dtype=F64)
    with pytest.raises(InputError, match="reads X-LoRA scalings"):
        interpret(g, p, x)
    with pytest.raises(InputError, match=r"shape \(2, 2\)"):
        interpret(g, p, x, scalings=torch.ones(2, 2, dtype=F64))
    gm = lowered(g, p)
    with pytest.raises(InputError, match="none were set for this forward"):
        gm(x)
    gm.xlora_scalings = torch.ones(3, 3, dtype=F64)
    with pytest.raises(InputError, match="reads 2 tokens of 3 experts"):
        gm(x)


def _with_route(g: Graph, route: nodes.Route) -> Graph:
    return g.replace(nodes=tuple(route if n.id == route.id else n for n in g.nodes))


def test_verifier_rules_of_the_xlora_gate():
    g = _graph(top_k=2)
    bad_k = _with_route(g, nodes.Route(id="route", src="scalings", experts=3, gate=nodes.XLoRAScale(top_k=4)))
    with pytest.raises(IRVerificationError, match=r"top_k = 4 outside \[1, 3\]"):
        verify(bad_k)
    bad_src = _with_route(g, nodes.Route(id="route", src="x", experts=3, gate=nodes.XLoRAScale()))
    with pytest.raises(IRVerificationError, match="reads the site's X-LoRA scalings"):
        verify(bad_src)


@st.composite
def xlora_graphs(draw):
    E = draw(st.integers(2, 4))
    router = dict(top_k=draw(st.sampled_from([None, *range(1, E + 1)])), softmax_topk=draw(st.booleans()),
                  global_scaling_weight=draw(st.sampled_from([1.0, 0.7])))
    pool = ExpertPool(experts=E, rank=draw(st.integers(1, 3)), router=XLoRARouter(**router),
                      frozen_experts=draw(st.booleans()), alpha=draw(st.sampled_from([None, 3.0])))
    return verify(build_graph(pool, SiteShape("s", draw(st.integers(2, 6)), draw(st.integers(2, 6)))))


def _run(g, params, x, s, routes):
    r = interpret(g, params, x, scalings=s, routing=routes)
    return r.output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=xlora_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6), softmaxed=st.booleans())
def test_lowered_xlora_matches_the_interpreter_before_and_after_the_passes(graph, seed, T, softmaxed):
    gen = torch.Generator().manual_seed(seed)
    params = make_params(graph, seed)
    x = torch.randn(T, graph.d_in, generator=gen, dtype=F64)
    s = torch.randn(T, graph.node("scalings").experts, generator=gen, dtype=F64)
    s = torch.softmax(s, 1) if softmaxed else s
    ref = interpret(graph, params, x, scalings=s)
    assume(all(m > MARGIN for m in ref.margins.values()))
    trainable = [d.name for d in graph.params if d.trainable]
    probe = None
    want = None
    for g in (graph, run_pipeline(graph, DEFAULT_PIPELINE)):
        leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
        xl, sl = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        y = _run(g, {**params, **leaves}, xl, sl, ref.routes)
        probe = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape) if probe is None else probe
        grads = torch.autograd.grad((y * probe).sum(), [xl, sl, *leaves.values()], allow_unused=True)
        if want is None:
            want = (y.detach(), dict(zip(["x", "s", *leaves], grads)))
            assert want[0].abs().max() > 0, "the experts must give a non-zero output"
        assert_close(y.detach(), want[0])  # the passes keep the meaning
        gm = lowered(g, params)
        xl, sl = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        gm.xlora_scalings = sl
        out, aux, _ = gm(xl)
        assert aux is None
        assert_close(out.detach(), want[0])
        (out * probe).sum().backward()
        assert_close(xl.grad, want[1]["x"], msg="grad of x")
        assert_close(sl.grad, want[1]["s"], msg="grad of the scalings")
        for k in trainable:
            if k in {d.name for d in g.params}:
                got, w = getattr(gm, k).grad, want[1][k]
                zeros = torch.zeros_like(params[k])
                assert_close(zeros if got is None else got, zeros if w is None else w, msg=f"grad of {k}")
