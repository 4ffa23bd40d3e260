"""The Triton routed low-rank kernels (``backends/triton/lowrank.py``): outputs and gradients
against the torch path and the float64 interpreter, the custom op's registrations, the
launcher's errors. On a CPU the kernels run in Triton's interpreter (``tests/conftest.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moleforge as mf
from models import kernel_choices_agree
from moleforge.backends.torch_fx import ops
from moleforge.backends.triton import enabled
from moleforge.backends.triton.lowrank import routed_lowrank
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import GroupedMix, interpret
from moleforge.passes import group_pools
from moleforge.specs import ExpertPool, TopKRouter
from strategies import lowered, make_params
from tolerances import assert_close

triton = pytest.importorskip("triton")


def _pool_inputs(T, d_in, d_out, E, r, k, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 0] -= 100.0  # expert 0 is never selected: an expert with no tokens
    index = logits.topk(k, -1).indices  # (T, k)
    gates = torch.zeros(T, E).scatter(1, index, torch.rand(T, k, generator=gen) + 0.1)
    a = torch.randn(1 if shared == "a" else E, r, d_in, generator=gen) / d_in ** 0.5
    b = torch.randn(1 if shared == "b" else E, d_out, r, generator=gen) * 0.5
    return x, gates, index, a, b


def _run(flag, x, gates, index, a, b, g):
    """``grouped_mix`` and its gradients with the kernels (``flag`` "1") or the torch path ("0")."""
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, a, b)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLEFORGE_TRITON", flag)
        y = ops.grouped_mix(leaves[0], leaves[1], index, leaves[2], leaves[3], 0.7)
        return y, torch.autograd.grad(y, leaves, g)


@settings(max_examples=8)
@given(T=st.integers(1, 12), d_in=st.integers(1, 24), d_out=st.integers(1, 40), E=st.integers(2, 4),
       r=st.integers(1, 5), k=st.integers(1, 2), shared=st.sampled_from(["", "a", "b"]), seed=st.integers(0, 99))
def test_kernels_match_the_torch_path(T, d_in, d_out, E, r, k, shared, seed):
    k = min(k, E - 1)
    x, gates, index, a, b = _pool_inputs(T, d_in, d_out, E, r, k, shared, seed)
    g = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed + 1))
    y_t, grads_t = _run("1", x, gates, index, a, b, g)
    y_ref, grads_ref = _run("0", x, gates, index, a, b, g)
    assert y_ref.abs().max() > 0
    assert_close(y_t, y_ref, "float32")
    for name, got, want in zip(("x", "gates", "a", "b"), grads_t, grads_ref):
        assert want.abs().max() > 0, name
        assert_close(got, want, "float32", msg=f"gradient of {name}")


def test_float64_is_accumulated_in_float64():
    x, gates, index, a, b = (t.double() if t.is_floating_point() else t for t in _pool_inputs(5, 7, 6, 3, 2, 2, "", 3))
    g = torch.randn(5, 6, dtype=torch.float64)
    y_t, grads_t = _run("1", x, gates, index, a, b, g)
    y_ref, grads_ref = _run("0", x, gates, index, a, b, g)
    assert_close(y_t, y_ref, "float64")
    for got, want in zip(grads_t, grads_ref):
        assert_close(got, want, "float64")


def test_opcheck():
    x, gates, index, a, b = _pool_inputs(6, 8, 5, 3, 2, 2, "", 4)
    row = torch.arange(6).repeat_interleave(2)
    w = gates.gather(1, index).reshape(-1)
    args = (x.requires_grad_(), row, w.requires_grad_(), index.reshape(-1), a.requires_grad_(), b.requires_grad_())
    torch.library.opcheck(torch.ops.moleforge.routed_lowrank.default, args)


def _pair_args():
    x, gates, index, a, b = _pool_inputs(4, 6, 5, 3, 2, 2, "", 5)
    return dict(x=x, row=torch.arange(4).repeat_interleave(2), w=gates.gather(1, index).reshape(-1),
                expert=index.reshape(-1), a=a, b=b)


@pytest.mark.parametrize("name,value,words", [
    ("x", torch.randn(4, 6, 1), "x has shape (4, 6, 1)"),
    ("row", torch.zeros(8, dtype=torch.int32), "row has shape (8,), dtype torch.int32"),
    ("expert", torch.zeros(7, dtype=torch.int64), "expert has shape (7,)"),
    ("w", torch.zeros(8, dtype=torch.float64), "w has shape (8,), dtype torch.float64"),
    ("a", torch.randn(3, 2, 5), "a has shape (3, 2, 5)"),
    ("b", torch.randn(3, 5, 4), "b has shape (3, 5, 4)"),
])
def test_launcher_names_the_bad_argument(name, value, words):
    args = _pair_args()
    args[name] = value
    with pytest.raises(ValueError, match="routed_lowrank: " + words.replace("(", r"\(").replace(")", r"\)")):
        routed_lowrank(**args)


def test_kernel_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("MOLEFORGE_TRITON", raising=False)
    assert not enabled(cpu)
    monkeypatch.setenv("MOLEFORGE_TRITON", "1")
    assert enabled(cpu)
    monkeypatch.setenv("MOLEFORGE_TRITON", "0")
    assert not enabled(cpu)


def test_grouped_pool_graph_matches_the_interpreter(monkeypatch):
    monkeypatch.setenv("MOLEFORGE_TRITON", "1")
    adapter = ExpertPool(experts=4, rank=3, alpha=6, router=TopKRouter(k=2))
    g = group_pools(build_graph(adapter, SiteShape(label="site", d_in=10, d_out=7)))
    assert any(isinstance(n, GroupedMix) for n in g.nodes)
    params = make_params(g, 3)
    x = torch.randn(9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for dtype, kind in ((torch.float64, "float64"), (torch.float32, "float32")):
        y, _, _ = lowered(g, params).to(dtype)(x.to(dtype))
        assert_close(y, interpret(g, params, x).output, kind)


def test_model_with_kernels_matches_the_torch_path():
    spec = mf.AdapterSpec(sites=[mf.Site(
        target=mf.Target(roles=["q", "v"]),
        adapter=mf.ExpertPool(experts=4, rank=2, alpha=4, router=mf.TopKRouter(k=2)),
        init=mf.Init(up="normal", std=0.2, seed=0))])
    kernel_choices_agree(spec, passes=[group_pools], code="grouped_mix")


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="routed_lowrank: the Triton kernels got a tensor on cpu.*TRITON_INTERPRET=1"):
        routed_lowrank(**_pair_args())
