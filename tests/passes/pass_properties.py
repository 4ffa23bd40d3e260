"""The four properties every pass must have, checked on one drawn graph:

1. the output graph verifies;
2. it means the same: the interpreter gives the same outputs and aux losses under the original's
   routing (fixed-routing mode), and the lowered module of the rewritten graph gives the
   interpreter's outputs and the gradients of every trainable tensor and of the input;
3. the pass is idempotent;
4. the input graph is not mutated.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import assume
from hypothesis.control import currently_in_test_context

from moleforge.ir import Graph, interpret, print_graph, verify
from strategies import frozen_inputs, lowered, make_params, xlora_scalings  # noqa: F401  (lowered: re-exported)
from tolerances import assert_close

MARGIN = 1e-7
"""Smallest top-k selection gap for which the lowered module (own routing) is compared."""

__all__ = ["check_pass", "lowered", "reference_grads"]


def _probe(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)


def reference_grads(graph: Graph, params: dict, x: torch.Tensor):
    """Interpreter output, aux total and gradients (trainable tensors and ``x``) of ``graph``."""
    trainable = [d.name for d in graph.params if d.trainable]
    leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
    x_leaf = x.clone().requires_grad_(True)
    res = interpret(graph, {**params, **leaves}, x_leaf, scalings=xlora_scalings(graph, x))
    aux = res.aux_total if graph.aux else None
    loss = (res.output * _probe(res.output)).sum() + (aux if aux is not None else 0.0)
    tensors = [x_leaf, *leaves.values()]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    named = dict(zip(["x", *leaves], grads))
    return res.output.detach(), None if aux is None else aux.detach(), named


def _module_grads(graph: Graph, params: dict, x: torch.Tensor):
    gm = lowered(graph, params)
    gm.xlora_scalings = xlora_scalings(graph, x)
    x_leaf = x.clone().requires_grad_(True)
    y, aux, _ = gm(x_leaf, **frozen_inputs(graph, params))
    loss = (y * _probe(y)).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    named = {"x": x_leaf.grad}
    named.update({d.name: getattr(gm, d.name).grad for d in graph.params if d.trainable})
    return y.detach(), None if aux is None else aux.detach(), named


def _same_grads(got: dict, want: dict) -> None:
    for k, w in want.items():
        g = got.get(k)
        if g is None and w is None:
            continue  # read by neither (a training-only noise projection, say)
        zeros = torch.zeros_like(w if w is not None else g)
        assert_close(zeros if g is None else g, zeros if w is None else w, msg=f"gradient of {k}")


def check_pass(pass_fn, graph: Graph, seed: int, x: torch.Tensor, params: dict | None = None) -> Graph:
    """Assert the four properties of ``pass_fn`` on ``graph``; return the rewritten graph.
    Parameters are drawn from ``seed`` unless given."""
    verify(graph)
    text, snapshot = print_graph(graph), copy.deepcopy(graph)
    out = pass_fn(graph)
    verify(out)                                                             # 1. verifies
    assert pass_fn(out) == out, "the pass is not idempotent"                # 3. idempotent
    assert print_graph(graph) == text and graph == snapshot, "the pass mutated its input"  # 4.
    params = make_params(graph, seed) if params is None else params
    s = xlora_scalings(graph, x)
    ref = interpret(graph, params, x, scalings=s)
    fixed = interpret(out, params, x, routing=ref.routes, scalings=s)                   # 2. same meaning
    assert_close(fixed.output, ref.output, msg="interpreter output after the pass")
    for name, value in ref.aux.items():
        assert_close(fixed.aux[name], value, msg=f"aux loss {name}")
    separated = all(m > MARGIN for m in ref.margins.values())
    if currently_in_test_context():
        assume(separated)
    assert separated, "a fixed example must have top-k margins: pick another seed"
    want_y, want_aux, want_grads = reference_grads(graph, params, x)
    got_y, got_aux, got_grads = _module_grads(out, params, x)
    assert_close(got_y, want_y, msg="lowered module output")
    if want_aux is not None:
        assert_close(got_aux, want_aux, msg="lowered module aux loss")
    _same_grads(got_grads, want_grads)
    return out
