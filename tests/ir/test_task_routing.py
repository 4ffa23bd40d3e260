"""Routing by task (``task``, ``task_embedding`` routers, the ``task_routing`` loss): the
interpreter on cases worked by hand, and hypothesis properties: the lowered module, before and
after the default pipeline, gives the interpreter's outputs, aux losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import InputError
from moleforge.ir import interpret, verify
from moleforge.specs import (
    ExpertPool,
    LocalizedBalance,
    TaskEmbeddingRouter,
    TaskRouter,
    TaskRoutingLoss,
    TopKRouter,
)
from sample_checks import assert_lowered_matches_the_interpreter
from strategies import lowered, make_params
from tolerances import assert_close

MARGIN = 1e-7


def _graph(router, aux=(), experts=3, rank=2, d_in=4, d_out=5, **pool):
    return verify(build_graph(ExpertPool(experts=experts, rank=rank, router=router, aux_losses=list(aux), **pool),
                              SiteShape("s", d_in, d_out)))


def _samples(types):
    types = torch.tensor(types)
    return torch.arange(len(types)), types


def test_hard_routing_sends_each_token_to_its_task_expert():
    g = _graph(TaskRouter())
    p = make_params(g, 0)
    x = torch.randn(3, 4, dtype=torch.float64)
    res = interpret(g, p, x, samples=_samples([2, 0, 2]))
    assert torch.equal(res.values["route"].gates, torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.float64))
    want = torch.stack([(x[t] @ p["A"][e].T) @ p["B"][e].T for t, e in enumerate([2, 0, 2])])
    assert_close(res.output, want)


def test_task_embedding_adds_the_task_row_to_the_logits():
    g = _graph(TaskEmbeddingRouter(tasks=2, k=None))
    p = make_params(g, 1)
    x = torch.randn(2, 4, dtype=torch.float64)
    res = interpret(g, p, x, samples=_samples([1, 0]))
    z = x @ p["router_w"].T + p["task_table"][[1, 0]]
    assert_close(res.values["route"].gates, torch.softmax(z, 1))


def test_task_only_embedding_ignores_the_token():
    g = _graph(TaskEmbeddingRouter(tasks=2, reads="task", k=1))
    p = make_params(g, 2)
    res = interpret(g, p, torch.randn(2, 4, dtype=torch.float64), samples=_samples([1, 1]))
    gates = res.values["route"].gates
    assert torch.equal(gates[0], gates[1]) and gates[0].sum() == 1
    assert int(gates[0].argmax()) == int(p["task_table"][1].argmax())


def test_supervised_routing_loss_by_hand():
    """CE of softmax(log p / τ) against the task: with p = softmax(z), that is softmax(z / τ)."""
    g = _graph(TopKRouter(k=2), aux=[TaskRoutingLoss(weight=0.3, temperature=2.0)])
    p = make_params(g, 3)
    x = torch.randn(3, 4, dtype=torch.float64)
    res = interpret(g, p, x, samples=_samples([0, 2, 1]))
    z = x @ p["router_w"].T
    ce = -torch.log_softmax(z / 2.0, 1)[[0, 1, 2], [0, 2, 1]].mean()
    assert_close(res.aux_total, 0.3 * ce)
    # the same loss at τ = 1 on a uniform router is log E
    g1 = _graph(TaskEmbeddingRouter(tasks=3, reads="task", k=None), aux=[TaskRoutingLoss(weight=1.0)])
    p1 = {**make_params(g1, 4), "task_table": torch.zeros(3, 3, dtype=torch.float64)}
    assert_close(interpret(g1, p1, x, samples=_samples([0, 1, 2])).aux_total,
                 torch.tensor(math.log(3), dtype=torch.float64))


def test_missing_or_out_of_range_task_ids_are_input_errors():
    g = _graph(TaskRouter())
    p, x = make_params(g, 0), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="called without task ids"):
        interpret(g, p, x)
    with pytest.raises(InputError, match=r"task id 3 is outside \[0, 3\)"):
        interpret(g, p, x, samples=_samples([0, 3]))
    gm = lowered(g, p)
    with pytest.raises(InputError, match="called without task ids"):
        gm(x)


@st.composite
def task_graphs(draw):
    E = draw(st.integers(2, 4))
    kind = draw(st.sampled_from(["task", "embed_token", "embed_task", "topk"]))
    k = draw(st.sampled_from([None, *range(1, E + 1)]))
    tasks = draw(st.integers(1, E))
    if kind == "task":
        router = TaskRouter()
    elif kind == "topk":
        router = TopKRouter(k=k or 1, temperature=draw(st.sampled_from([1.0, 0.5])))
    else:
        router = TaskEmbeddingRouter(tasks=tasks, k=k, reads="token_and_task" if kind == "embed_token" else "task",
                                     renormalize=draw(st.booleans()), temperature=draw(st.sampled_from([1.0, 2.0])))
    aux = [TaskRoutingLoss(weight=draw(st.sampled_from([0.1, 1.0])), temperature=draw(st.sampled_from([1.0, 3.0])))]
    if draw(st.booleans()):
        aux.append(LocalizedBalance(weight=0.2, delta=0.3, groups=2))
    graph = _graph(router, aux, experts=E, rank=draw(st.integers(1, 3)), d_in=draw(st.integers(2, 6)),
                   d_out=draw(st.integers(2, 6)), frozen_experts=draw(st.booleans()))
    bound = E if kind in ("task", "topk") else tasks
    return graph, bound


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=task_graphs(), seed=st.integers(0, 2**16), data=st.data())
def test_lowered_task_routing_matches_the_interpreter_before_and_after_the_passes(drawn, seed, data):
    graph, bound = drawn
    T = data.draw(st.integers(1, 6))
    B = data.draw(st.integers(1, 3))
    sample = torch.tensor(sorted(data.draw(st.lists(st.integers(0, B - 1), min_size=T, max_size=T))))
    types = torch.tensor(data.draw(st.lists(st.integers(0, bound - 1), min_size=B, max_size=B)))[sample]
    samples = (sample, types)
    params = make_params(graph, seed)
    x = torch.randn(T, graph.d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = interpret(graph, params, x, samples=samples)
    assume(all(m > MARGIN for m in ref.margins.values()))
    assert_lowered_matches_the_interpreter(graph, params, x, samples, ref)
