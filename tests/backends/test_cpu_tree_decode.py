"""The compiled CPU kernel of a residual tree's decode step (``backends/cpu/tree_decode.py``):
routing and propagation without autograd at the kernel policy's decode sizes equal the float64
interpreter on every tree option the kernel takes (switch and dense gates, every activation
position: propagation ``all`` in the kernel, the others in torch ops after the kernel's
routing), on graphs before and after the default pipeline; an S'MoRE Llama decodes the same
logits with the kernel as with the torch ops; the kernel refuses what it cannot take."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import moleforge as mf
from models import assert_same_generation, greedy, kernel_and_torch_ops
from moleforge.backends.cpu import tree_decode
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import TreeMix, TreePropagate, TreeRoute, interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from strategies import graphs, inputs_for, lowered, make_params, trees
from tolerances import assert_close

MARGIN = 1e-7
KERNEL = KernelPolicy(triton="off", cpu="on", decode_tokens=8)
"""Every drawn input (1-6 tokens) takes the decode path, with the CPU kernel built."""


@contextmanager
def _counted():
    """Counts of the kernel's route and propagate calls in the block."""
    calls = {"route": 0, "propagate": 0}

    def spy(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    with mock.patch.object(tree_decode, "route", spy("route", tree_decode.route)), \
            mock.patch.object(tree_decode, "propagate", spy("propagate", tree_decode.propagate)):
        yield calls


@given(graph=graphs(trees(gates=("switch", "dense"))), pipeline=st.booleans(), data=st.data())
def test_trees_on_the_decode_kernel_match_the_interpreter(graph, pipeline, data):
    graph = run_pipeline(graph, DEFAULT_PIPELINE) if pipeline else graph
    verify(graph)
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    ref = interpret(graph, params, x)
    assume(all(m > MARGIN for m in ref.margins.values()))
    gm = lowered(graph, params, policy=KERNEL)
    with torch.no_grad(), _counted() as calls:
        y = gm(x)[0]
    assert_close(y, ref.output)
    routes = sum(isinstance(n, TreeRoute) for n in graph.nodes)
    assert calls["route"] == routes, "the kernel did not route"
    everywhere = [n for n in graph.nodes if isinstance(n, (TreePropagate, TreeMix))]
    assert calls["propagate"] == sum(n.position == "all" for n in everywhere), "the kernel did not propagate"
    with _counted() as calls:  # with autograd the torch ops run, same values
        y_grad = gm(x)[0]
    assert calls == {"route": 0, "propagate": 0}
    assert_close(y_grad.detach(), ref.output)


@given(graph=graphs(trees(gates=("switch", "dense"))), data=st.data())
def test_the_kernel_in_float32_matches_the_torch_ops(graph, data):
    verify(graph)
    params = {k: v.float() for k, v in make_params(graph, data.draw(st.integers(0, 2**16))).items()}
    x = data.draw(inputs_for(graph)).float()
    ref = interpret(graph, {k: v.double() for k, v in params.items()}, x.double())
    assume(all(m > 1e-4 for m in ref.margins.values()))
    outs = []
    for policy in (KERNEL, KernelPolicy(triton="off", cpu="off", decode_tokens=8)):
        gm = lowered(graph, params, policy=policy).float()
        with torch.no_grad():
            outs.append(gm(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_above_the_decode_sizes_the_torch_ops_run():
    spec = mf.presets.load("smore").sites[0].adapter
    graph = build_graph(spec, SiteShape(label="site", d_in=6, d_out=5))
    params = make_params(graph, 0)
    gm = lowered(graph, params, policy=KernelPolicy(triton="off", cpu="on", decode_tokens=2))
    x = torch.randn(3, graph.d_in, dtype=torch.float64)
    with torch.no_grad(), _counted() as calls:
        gm(x)
    assert calls == {"route": 0, "propagate": 0}


def test_an_smore_llama_decodes_the_same_tokens_and_logits_with_the_kernel():
    spec = mf.presets.load("smore").with_init(mf.Init(up="normal", std=0.05, seed=0))
    with_kernel, without = kernel_and_torch_ops(spec, KERNEL)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with _counted() as calls:
        a = greedy(with_kernel, ids)
    assert calls["route"] > 0 and calls["propagate"] > 0
    assert_same_generation(a, greedy(without, ids))


def test_the_kernel_names_a_bad_expert_index():
    h_all = torch.randn(1, 4, dtype=torch.float64)
    B = torch.randn(2, 3, 2, dtype=torch.float64)
    bad = torch.tensor([[[5]]])
    KernelPolicy(cpu="on").with_cpu_build()
    with pytest.raises(RuntimeError, match="expert index 5 outside pool 0 of 2 experts"):
        tree_decode.propagate(h_all, (bad,), (torch.ones(1, 1, 1, dtype=torch.float64),), [(B, None, None, None, 1.0)],
                              "tanh")
