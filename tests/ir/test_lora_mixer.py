"""LoRA-Mixer's router (dense in training, top-k in evaluation) and RSL loss: cases worked by
hand, and hypothesis properties: in both modes the lowered module, before and after the default
pipeline, gives the interpreter's outputs, aux losses and gradients."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import DenseTrainTopKRouter, ExpertPool, RSLLoss
from strategies import lowered, make_params
from tolerances import assert_close

MARGIN = 1e-7


def _graph(k=2, experts=4, aux=(), **kw):
    return verify(build_graph(ExpertPool(experts=experts, rank=2, router=DenseTrainTopKRouter(k=k, **kw),
                                         aux_losses=list(aux)), SiteShape("s", 5, 3)))


def test_dense_in_training_top_k_in_evaluation():
    g = _graph(k=2)
    p = make_params(g, 0)
    x = torch.randn(3, 5, dtype=torch.float64)
    probs = torch.softmax(x @ p["router_w"].T, 1)
    train = interpret(g, p, x, training=True).values["route"].gates
    assert_close(train, probs)
    ev = interpret(g, p, x).values["route"].gates
    assert ((ev > 0).sum(1) == 2).all()
    top = probs.topk(2, 1)
    assert_close(ev.gather(1, top.indices), top.values / top.values.sum(1, keepdim=True))


def test_rsl_by_hand_and_its_sign():
    """``α Σ P_i f_i - λ mean H``: with λ > 0 (the printed sign) a flatter routing lowers it."""
    g = _graph(k=1, aux=[RSLLoss(weight=0.7, entropy=0.2)])
    p = make_params(g, 1)
    x = torch.randn(4, 5, dtype=torch.float64)
    probs = torch.softmax(x @ p["router_w"].T, 1)
    share = torch.bincount(probs.argmax(1), minlength=4).double() / 4
    H = -(probs * probs.log()).sum(1).mean()
    for training in (False, True):
        assert_close(interpret(g, p, x, training=training).aux_total, 0.7 * (probs.mean(0) * share).sum() - 0.2 * H)
    entropy_only = _graph(k=1, aux=[RSLLoss(weight=0.0, entropy=0.2)])
    sharp = interpret(entropy_only, {**p, "router_w": 5 * p["router_w"]}, x).aux_total
    flat = interpret(entropy_only, {**p, "router_w": 0.2 * p["router_w"]}, x).aux_total
    assert flat < sharp, "the printed sign rewards entropy"


@st.composite
def mixer_graphs(draw):
    E = draw(st.integers(2, 5))
    aux = [RSLLoss(weight=draw(st.sampled_from([0.0, 0.3])), entropy=draw(st.sampled_from([-0.2, 0.0, 0.5])))]
    return verify(build_graph(
        ExpertPool(experts=E, rank=draw(st.integers(1, 3)), aux_losses=aux if draw(st.booleans()) else [],
                   router=DenseTrainTopKRouter(k=draw(st.integers(1, E)), renormalize=draw(st.booleans()),
                                               temperature=draw(st.sampled_from([1.0, 0.5]))),
                   frozen_experts=draw(st.booleans())),
        SiteShape("s", draw(st.integers(2, 6)), draw(st.integers(2, 6)))))


def _grads(loss_of, x, params, names):
    leaves = {k: params[k].clone().requires_grad_(True) for k in names}
    x_leaf = x.clone().requires_grad_(True)
    y, aux = loss_of(x_leaf, leaves)
    probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    grads = torch.autograd.grad((y * probe).sum() + aux, [x_leaf, *leaves.values()], allow_unused=True)
    return y.detach(), aux.detach(), dict(zip(["x", *leaves], grads))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=mixer_graphs(), seed=st.integers(0, 2**16), training=st.booleans(), T=st.integers(1, 6))
def test_lowered_mixer_matches_the_interpreter_in_both_modes(graph, seed, training, T):
    params = make_params(graph, seed)
    x = torch.randn(T, graph.d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = interpret(graph, params, x, training=training)
    assume(all(m > MARGIN for m in ref.margins.values()))
    trainable = [d.name for d in graph.params if d.trainable]

    def interpreted(g):
        def run(xl, leaves):
            r = interpret(g, {**params, **leaves}, xl, training=training)
            return r.output, r.aux_total
        return run

    want = _grads(interpreted(graph), x, params, trainable)
    for g in (graph, run_pipeline(graph, DEFAULT_PIPELINE)):
        got = _grads(interpreted(g), x, params, trainable)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
        gm = lowered(g, params).train(training)
        x_leaf = x.clone().requires_grad_(True)
        y, aux, _ = gm(x_leaf)
        aux = aux if aux is not None else torch.zeros((), dtype=torch.float64)
        assert_close(y.detach(), want[0])
        assert_close(aux.detach(), want[1])
        probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        ((y * probe).sum() + aux).backward()
        assert_close(x_leaf.grad, want[2]["x"], msg="grad of x")
        for d in g.params:
            if d.trainable and d.name in want[2]:
                w, got_g = want[2][d.name], getattr(gm, d.name).grad
                zeros = torch.zeros_like(params[d.name])
                assert_close(zeros if got_g is None else got_g, zeros if w is None else w, msg=f"grad of {d.name}")
