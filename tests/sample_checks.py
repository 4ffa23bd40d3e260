"""A site that reads per-sample inputs (task ids, sample types) against the float64 interpreter:
the plain graph and the default pipeline's, interpreted and lowered, give the plain graph's
outputs, aux losses and gradients (of ``x`` and every trainable tensor) on the same samples."""

from __future__ import annotations

import torch

from moleforge.ir import Graph, interpret
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from strategies import lowered
from tolerances import assert_close

__all__ = ["interpreted_grads", "assert_lowered_matches_the_interpreter"]


def interpreted_grads(run, x: torch.Tensor, params: dict, trainable: list[str]):
    """``(output, aux, {"x" / name: gradient})`` of ``run(x, leaves)`` under a fixed probe of the output."""
    leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
    x_leaf = x.clone().requires_grad_(True)
    y, aux = run(x_leaf, leaves)
    probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    grads = torch.autograd.grad((y * probe).sum() + aux, [x_leaf, *leaves.values()], allow_unused=True)
    return y.detach(), aux.detach(), dict(zip(["x", *leaves], grads))


def assert_lowered_matches_the_interpreter(graph: Graph, params: dict, x: torch.Tensor, samples, ref) -> None:
    """``graph`` and its default pipeline's form, interpreted on the routing of ``ref`` (the plain
    graph's interpretation) and lowered, equal the plain interpretation on ``x`` and ``samples``."""
    trainable = [d.name for d in graph.params if d.trainable]

    def run_ref(g):
        def run(xl, leaves):
            r = interpret(g, {**params, **leaves}, xl, samples=samples, routing=ref.routes)
            return r.output, r.aux_total
        return run

    want = interpreted_grads(run_ref(graph), x, params, trainable)
    for g in (graph, run_pipeline(graph, DEFAULT_PIPELINE)):
        got = interpreted_grads(run_ref(g), x, params, trainable)  # the passes keep the meaning
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
        gm = lowered(g, params)
        x_leaf = x.clone().requires_grad_(True)
        y, aux, _ = gm(x_leaf, samples)
        aux = torch.zeros((), dtype=torch.float64) if aux is None else aux
        assert_close(y.detach(), want[0])
        assert_close(aux.detach(), want[1])
        probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        ((y * probe).sum() + aux).backward()
        assert_close(x_leaf.grad, want[2]["x"], msg="grad of x")
        names = {d.name for d in g.params}
        for k in trainable:
            if k not in names:
                continue
            got_k, w = getattr(gm, k).grad, want[2][k]
            zeros = torch.zeros_like(params[k])
            assert_close(zeros if got_k is None else got_k, zeros if w is None else w, msg=f"grad of {k}")
