"""The Triton residual-tree node kernels (``backends/triton/tree.py``): outputs and gradients
against the torch propagation and the float64 interpreter, the custom op's registrations, the
launcher's errors. The kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py``
sets it without a GPU), chosen by an explicit kernel policy. On a GPU: ``test_triton_gpu.py``."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moleforge as mf
from models import kernel_choices_agree
from moleforge.backends.runtime.ops_tree_prop import propagate_all
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy
from moleforge.backends.triton.tree import node_mix
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import interpret
from strategies import lowered, make_params
from tolerances import assert_close

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors, in Triton's interpreter")

TRITON = KernelPolicy(triton="on", cpu="off", interpret=True, decode_tokens=0)
"""The Triton kernels, on CPU tensors in the interpreter, at every size (no decode path)."""


@st.composite
def trees(draw):
    """Per pool (leaves first) ``(s, r, d, f, scale, with_b, with_w)``, token count, activation
    and seed; every pool above the leaves has its transform ``W``, with or without bias."""
    L = draw(st.integers(1, 3))
    pools = []
    for _ in range(L):
        f = draw(st.integers(1, 2))
        pools.append((draw(st.integers(f, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 8)), f,
                      draw(st.sampled_from([1.0, 0.5])), draw(st.booleans()), draw(st.booleans())))
    return pools, draw(st.integers(1, 6)), draw(st.sampled_from(["tanh", "relu", "identity"])), draw(st.integers(0, 99))


def _tree_inputs(pools, T, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.7  # noqa: E731
    L = len(pools)
    h_all = rnd(T, sum(s * r for s, r, *_ in pools))
    indices, weights, levels = [], [], []
    for l, (s, r, d, f, scale, with_b, with_w) in enumerate(pools):
        C = 1
        for _, _, _, f_up, *_ in pools[l + 1:]:
            C *= f_up
        indices.append(torch.randint(0, s, (T, C, f), generator=gen))
        weights.append(torch.rand(T, C, f, generator=gen) + 0.1)
        d_prev = pools[l - 1][2] if l else None
        W = rnd(d, d_prev) if l else None
        levels.append([rnd(s, d, r), rnd(s, d) if with_b else None, W, rnd(d) if l and with_w else None, scale])
    assert L == len(levels)
    return h_all, indices, weights, levels


def _leaves(h_all, weights, levels):
    tensors = [h_all, *weights] + [t for lv in levels for t in lv[:4] if t is not None]
    return [t.requires_grad_(True) for t in tensors]


def _run(policy, pools, T, activation, seed):
    h_all, indices, weights, levels = _tree_inputs(pools, T, seed)
    leaves = _leaves(h_all, weights, levels)
    out = propagate_all(h_all, tuple(indices), tuple(weights), levels, activation, policy)
    probe = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return out, torch.autograd.grad(out, leaves, probe)


@settings(max_examples=10)
@given(case=trees())
def test_kernels_match_the_torch_propagation(case):
    pools, T, activation, seed = case
    out_t, grads_t = _run(TRITON, pools, T, activation, seed)
    out_ref, grads_ref = _run(TORCH_OPS, pools, T, activation, seed)
    assume(out_ref.abs().max() > 0)  # relu can zero a one-element tree
    assert_close(out_t, out_ref, "float32")
    for i, (got, want) in enumerate(zip(grads_t, grads_ref)):
        assert_close(got, want, "float32", msg=f"gradient of leaf {i}")


def _mix_args(f=2, activation="tanh", with_v=True):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3 * 4, 5, generator=gen)
    flat = torch.randint(0, 12, (8,), generator=gen)
    v = torch.randn(8, 5, generator=gen) if with_v else None
    return dict(u=u, flat=flat, v=v, weight=torch.rand(8, generator=gen), f=f, activation=activation)


@pytest.mark.parametrize("with_v", [True, False])
def test_opcheck(with_v):
    args = _mix_args(with_v=with_v)
    for name in ("u", "v", "weight"):
        if args[name] is not None:
            args[name].requires_grad_(True)
    torch.library.opcheck(torch.ops.moleforge.tree_node_mix.default, tuple(args.values()))


@pytest.mark.parametrize("name,value,words", [
    ("u", torch.randn(12, 5, 1), "u has shape (12, 5, 1)"),
    ("flat", torch.zeros(8, dtype=torch.int32), "flat has shape (8,), dtype torch.int32"),
    ("flat", torch.zeros(7, dtype=torch.int64), "flat has shape (7,)"),
    ("weight", torch.zeros(8, dtype=torch.float64), "weight has shape (8,), dtype torch.float64"),
    ("v", torch.randn(8, 4), "v has shape (8, 4)"),
    ("activation", "gelu", "activation 'gelu' is not one of"),
    ("f", 0, "fanout f=0"),
])
def test_launcher_names_the_bad_argument(name, value, words):
    args = _mix_args()
    args[name] = value
    with pytest.raises(ValueError, match="tree_node_mix: " + words.replace("(", r"\(").replace(")", r"\)")):
        node_mix(**args)


def _tree_spec(gate: str = "switch"):
    return mf.ResidualTree(levels=[mf.TreeLevel(experts=3, rank=2, fanout=1), mf.TreeLevel(experts=4, rank=2, fanout=2),
                                   mf.TreeLevel(experts=2, rank=3, fanout=2)],
                           activation="tanh", router=mf.TreeRouter(gate=gate, down_dim=4, key_dim=4))


def test_tree_graph_matches_the_interpreter(monkeypatch):
    g = build_graph(_tree_spec(), SiteShape(label="site", d_in=10, d_out=7))
    params = make_params(g, 5)
    x = torch.randn(9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    calls = []
    real = node_mix
    monkeypatch.setattr("moleforge.backends.triton.tree.node_mix", lambda *a: calls.append(1) or real(*a))
    y, _, _ = lowered(g, params, policy=TRITON)(x)
    assert calls, "the Triton node kernel did not run"
    assert_close(y, interpret(g, params, x).output, "float64")


def test_model_with_kernels_matches_the_torch_path():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up", "down"]), adapter=_tree_spec(),
                                         init=mf.Init(up="normal", std=0.2, seed=0))])
    kernel_choices_agree(spec, code="tree_propagate")


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="tree_node_mix: the Triton kernels got a tensor on cpu.*TRITON_INTERPRET=1"):
        node_mix(**_mix_args())
