"""A lowered site given a token mask (``mask (T,)``, ``False`` on padding): its aux losses, their
gradients and the balancing routers' selection counts equal those of the real tokens alone,
while its output and routing ignore the mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moleforge.backends.runtime.ops_tree import TreeRouting, tree_aux
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import counts_name, lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import AbsTopK, SigmoidTopK, TreeRoute, interpret
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import presets
from strategies import graphs, make_params, pools, rank_partitions, trees
from tolerances import assert_close

MARGIN = 1e-7
PIPELINES = {"plain": (), "default": DEFAULT_PIPELINE}


def _lowered(graph, seed: int):
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for name, value in make_params(graph, seed).items():
            getattr(store, name).copy_(value)
    return lower(graph, store)


@st.composite
def padded_tokens(draw, d_in: int):
    """``(x (T, d_in), mask (T,) with a real token, samples)``; ``samples`` gives each token a
    sample of 1-3 and each sample a type (localized balancing)."""
    T = draw(st.integers(1, 7))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=T, max_size=T).filter(any)))
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
                    dtype=torch.float64)
    B = draw(st.integers(1, 3))
    sample = torch.tensor(sorted(draw(st.lists(st.integers(0, B - 1), min_size=T, max_size=T))))
    types = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=B, max_size=B)))[sample]
    return x, mask, (sample, types)


def _real(samples, mask):
    return samples[0][mask], samples[1][mask]


def _clear_margins(graph, seed: int, x, samples) -> bool:
    """No near-tie in any top-k over ``x`` (so the real tokens route alike in both runs)."""
    ref = interpret(graph, make_params(graph, seed), x, samples=samples)
    return all(m > MARGIN for m in ref.margins.values())


def _aux_and_grads(gm, x, samples, mask=None):
    leaf = x.clone().requires_grad_(True)
    params = [p for p in gm.parameters() if p.requires_grad]
    y, aux, _ = gm(leaf, samples, mask=mask)
    if not aux.requires_grad:  # a tree whose aux is a constant zero
        return y, aux, []
    grads = torch.autograd.grad(aux, [leaf, *params], allow_unused=True)
    return y, aux, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [leaf, *params])]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(graph=graphs(st.one_of(pools(magnitudes=False), trees())), seed=st.integers(0, 2**16), data=st.data())
def test_masked_aux_equals_the_aux_of_the_real_tokens(pipeline, graph, seed, data):
    assume(graph.aux)
    graph = run_pipeline(graph, PIPELINES[pipeline])
    x, mask, samples = data.draw(padded_tokens(graph.d_in))
    assume(_clear_margins(graph, seed, x, samples))
    gm = _lowered(graph, seed).eval()  # eval: no routing noise
    y, aux, grads = _aux_and_grads(gm, x, samples, mask)
    y_all, aux_all, _ = gm(x, samples)
    _, aux_real, grads_real = _aux_and_grads(gm, x[mask], _real(samples, mask))
    assert torch.equal(y, y_all), "the adapter output must not depend on the mask"
    assert_close(aux, aux_real)
    if grads:
        x_grad, *param_grads = grads
        assert_close(x_grad[mask], grads_real[0], msg="gradient of the real tokens")
        assert torch.equal(x_grad[~mask], torch.zeros_like(x_grad[~mask])), "padding must not enter the aux"
        for i, (g, want) in enumerate(zip(param_grads, grads_real[1:])):
            assert_close(g, want, msg=f"gradient of parameter {i}")


def _count_buffers(graph) -> list[str]:
    return [counts_name(n.gate.balance.name) for n in graph.nodes
            if isinstance(getattr(n, "gate", None), (SigmoidTopK, AbsTopK))]


BALANCED = ("sigmoid_topk", "implicit_topk")
"""The routers with a balancing bias, which count their selections (SMoRA, FlyLoRA)."""


@given(graph=graphs(st.one_of(pools(kinds=BALANCED, magnitudes=False), rank_partitions(kinds=BALANCED[:1]))),
       seed=st.integers(0, 2**16), data=st.data())
def test_balancing_counts_count_the_real_tokens(graph, seed, data):
    names = _count_buffers(graph)
    assume(names)
    x, mask, samples = data.draw(padded_tokens(graph.d_in))
    assume(_clear_margins(graph, seed, x, samples))
    padded, real = _lowered(graph, seed).train(), _lowered(graph, seed).train()
    padded(x, samples, mask=mask)
    real(x[mask], _real(samples, mask))
    k = next(n.gate.k for n in graph.nodes if isinstance(getattr(n, "gate", None), (SigmoidTopK, AbsTopK)))
    for name in names:
        got = getattr(padded, name)
        assert torch.equal(got, getattr(real, name)), name
        assert got.sum() == mask.sum() * k


@given(seed=st.integers(0, 2**16), data=st.data())
def test_masked_smooth_load_of_the_training_noisy_gate(seed, data):
    """The noisy gate in training (fresh noise per token, so a run on the real tokens alone
    would draw other noise): the masked tree aux equals the aux of the routing's real rows."""
    graph = build_graph(presets.load("smore_noisy").sites[0].adapter, SiteShape(label="site", d_in=4, d_out=3))
    x, mask, _ = data.draw(padded_tokens(graph.d_in))
    gm = _lowered(graph, seed).train()
    gm.noise_generator = torch.Generator().manual_seed(seed)
    _, aux, routes = gm(x, mask=mask)
    route_id = next(n.id for n in graph.nodes if isinstance(n, TreeRoute))
    route = routes[route_id]
    assert all(load is not None for load in route.smooth_load), "training noise gives a smooth load"
    T = x.shape[0]
    rows = tuple(tuple(t[mask] for t in part) for part in (route.indices, route.weights, route.probs))
    loads = tuple(None if load is None else load.view(load.shape[0], T, -1)[:, mask].reshape(load.shape[0], -1)
                  for load in route.smooth_load)
    real = TreeRouting(*rows, route.gate, loads)
    aux_node = graph.node(graph.aux[0])
    assert_close(aux, tree_aux(real, aux_node.kind, aux_node.weight))
