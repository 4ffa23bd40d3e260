"""fuse_sibling_sites: sites reading the same tensor share one input GEMM (METHODS.md §20.11)."""

from __future__ import annotations

import copy

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pass_properties import MARGIN, lowered, reference_grads

from moleforge.backends.runtime.siblings import SiblingGroup
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import SiblingLinear, interpret, print_graph, verify
from moleforge.passes import DEFAULT_PIPELINE, fuse_sibling_sites, run_pipeline
from strategies import adapters, frozen_inputs, make_params
from tolerances import assert_close


@st.composite
def sibling_sets(draw):
    """2-3 optimised site graphs on the same input width, and an input."""
    d_in = draw(st.integers(1, 9))
    graphs = {}
    for i in range(draw(st.integers(2, 3))):
        shape = SiteShape(f"block.proj{i}", d_in, draw(st.integers(1, 9)))
        graphs[shape.label] = run_pipeline(build_graph(draw(adapters()), shape), DEFAULT_PIPELINE)
    x = torch.randn(draw(st.integers(1, 6)), d_in, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return graphs, x


def _members_output_and_grads(graphs, params, x):
    """Run every member's module on the same ``x`` with one runtime group; backprop a probe of each."""
    groups = {n.group: SiblingGroup(n.group) for g in graphs.values() for n in g.nodes if isinstance(n, SiblingLinear)}
    modules = {name: lowered(g, params[name], groups) for name, g in graphs.items()}
    x_leaf = x.clone().requires_grad_(True)
    results = {name: m(x_leaf, **frozen_inputs(graphs[name], params[name])) for name, m in modules.items()}
    outs = {name: r[0] for name, r in results.items()}
    loss = sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum() for y in outs.values())
    loss = loss + sum(r[1] for r in results.values() if r[1] is not None)
    loss.backward()
    return outs, x_leaf.grad, modules


@given(case=sibling_sets(), seed=st.integers(0, 2**16))
def test_properties(case, seed):
    graphs, x = case
    names = list(graphs)
    before, snapshot = {k: print_graph(g) for k, g in graphs.items()}, copy.deepcopy(graphs)
    out = fuse_sibling_sites(graphs, [names])
    for g in out.values():
        verify(g)                                                                    # 1. verifies
    assert fuse_sibling_sites(out, [names]) == out                                   # 3. idempotent
    assert {k: print_graph(g) for k, g in graphs.items()} == before and graphs == snapshot   # 4. untouched
    params = {k: make_params(g, seed) for k, g in graphs.items()}
    x_grad_want = torch.zeros_like(x)
    for name, g in graphs.items():                                                   # 2. same meaning
        ref = interpret(g, params[name], x)
        assert_close(interpret(out[name], params[name], x, routing=ref.routes).output, ref.output)
        assume(all(m > MARGIN for m in ref.margins.values()))
        x_grad_want += reference_grads(g, params[name], x)[2]["x"]
    outs, x_grad, modules = _members_output_and_grads(out, params, x)
    for name, g in graphs.items():
        assert_close(outs[name].detach(), interpret(g, params[name], x).output)
        want = reference_grads(g, params[name], x)[2]
        for d in g.params:
            if d.trainable and want[d.name] is not None:
                assert_close(getattr(modules[name], d.name).grad, want[d.name], msg=d.name)
    assert_close(x_grad, x_grad_want, msg="gradient of the shared input")


def test_one_gemm_serves_every_member_of_a_group():
    from moleforge.specs import presets
    shapes = [SiteShape(f"attn.{p}", 8, w) for p, w in (("q", 8), ("k", 4), ("v", 4))]
    graphs = {s.label: run_pipeline(build_graph(presets.load("molora").sites[0].adapter, s), DEFAULT_PIPELINE)
              for s in shapes}
    out = fuse_sibling_sites(graphs, [list(graphs)])
    nodes = [next(n for n in g.nodes if isinstance(n, SiblingLinear)) for g in out.values()]
    assert [(n.start, n.stop) for n in nodes] == [(0, 72), (72, 144), (144, 216)]
    assert nodes[0].group == "attn.{q,k,v}"
    params = {k: make_params(g, 1) for k, g in out.items()}
    group = SiblingGroup(nodes[0].group)
    modules = [lowered(g, params[k], {group.name: group}) for k, g in out.items()]
    x = torch.randn(5, 8, dtype=torch.float64)
    ys = [m(x)[0] for m in modules]
    assert group.gemms == 1, "q, k and v read one GEMM"
    for y, (name, g) in zip(ys, out.items()):
        assert_close(y, interpret(g, params[name], x).output)
    modules[0](x)
    modules[0](x + 1)
    assert group.gemms == 3, "a repeated or different input computes afresh"
