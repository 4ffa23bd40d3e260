"""moleforge's S'MoRE runtime equals the float64 interpreter (values, aux losses and the
gradients of the input and every parameter) over every tree option; the spec's official
conventions and their validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moleforge as mf
from conftest import assert_close
from moleforge.ir import Jitter, interpret
from smore_helpers import both_ways, compile_tree, trees


def _compare(mine, ref, names):
    (delta, aux, got), (out, ref_aux, want) = mine, ref
    assert_close(delta, out, "float64")
    if ref_aux is None:
        assert aux is None
    else:
        assert_close(aux, ref_aux, "float64")
    for name, g, r in zip(names, got, want):
        assert_close(g, r, "float64", msg=f"gradient of {name}")


@pytest.mark.parametrize("passes", [(), None], ids=["plain", "default-pipeline"])
@given(tree=trees(), d_in=st.integers(2, 6), d_out=st.integers(1, 5), T=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_runtime_equals_interpreter(passes, tree, d_in, d_out, T, seed):
    """Both lowerings: the plain IR (routing and propagation in one block) and the default
    pipeline's (all down-projections in one GEMM, routing and propagation apart)."""
    model, handle = compile_tree(tree, d_in, d_out, seed, passes=passes)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, d_in, generator=gen, dtype=torch.float64)
    grad = torch.randn(T, d_out, generator=gen, dtype=torch.float64)
    _compare(*both_ways(model, handle, x, grad))


def test_every_parameter_gets_a_gradient():
    """With biases, every trainable tensor but the (training-only) noise projection matters."""
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=3, rank=2, fanout=2)] * 3, activation="tanh",
                           router=mf.TreeRouter(gate="switch", down_dim=4, key_dim=3),
                           aux_losses=[mf.SwitchLoadBalance(weight=0.1)])
    model, handle = compile_tree(tree, 5, 4, seed=3)
    model.eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    (_, _, got), _, names = both_ways(model, handle, x, torch.randn(6, 4, dtype=torch.float64))
    dead = [n for n, g in zip(names, got) if g.abs().max() == 0]
    assert dead == []


def test_unfused_lowering_equals_interpreter():
    """When the router's down-projection cannot share the experts' GEMM (here a jitter node in
    between, identity in evaluation), the separate route/down/propagate ops give the same values."""
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=3, rank=2, fanout=2), mf.TreeLevel(experts=2, rank=3,
                                                                                            fanout=1)],
                           router=mf.TreeRouter(gate="switch", down_dim=3, key_dim=2))
    model, handle = compile_tree(tree, 5, 4, seed=1)
    g = handle.graphs["proj"]
    lin = g.node("x_down")
    nodes = []
    for n in g.nodes:
        if n.id == "x_down":
            nodes.append(Jitter(id="jit", src="x", eps=0.1))
            n = type(n)(id=n.id, src="jit", weight=n.weight, bias=n.bias, origin=lin.origin)
        nodes.append(n)
    g2 = g.replace(nodes=tuple(nodes))
    from moleforge.backends.torch_fx.lower import lower
    gm = lower(g2, handle.modules["proj"].site).eval()
    assert "tree_inputs" not in gm.code and "tree_down" in gm.code
    x = torch.randn(4, 5, dtype=torch.float64)
    delta, _, routes = gm(x)
    params = {d.name: getattr(handle.modules["proj"].site, d.name).detach() for d in g.params}
    ref = interpret(g2, params, x, routing={"route": routes["route"][0]})
    assert_close(delta, ref.output, "float64")


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_float32_runtime_is_close(seed):
    """float32 sites (the default) stay within the float32 tolerance of the interpreter."""
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=4, rank=3, fanout=2)] * 2,
                           router=mf.TreeRouter(gate="switch", down_dim=6, key_dim=4))
    model, handle = compile_tree(tree, 16, 12, seed, dtype=torch.float32)
    model.eval()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    delta, _, routes = handle.modules["proj"].site(x)
    g = handle.graphs["proj"]
    params = {d.name: getattr(handle.modules["proj"].site, d.name).detach() for d in g.params}
    ref = interpret(g, params, x, routing={"route": routes["route"][0]})
    assert_close(delta, ref.output, "float32")


# ---- spec ------------------------------------------------------------------------------------

def test_official_conventions_need_unit_temperature():
    with pytest.raises(mf.SpecError, match="temperature"):
        mf.ResidualTree(conventions="official", router=mf.TreeRouter(temperature=0.5))


def test_dense_gate_takes_no_aux_loss():
    with pytest.raises(mf.SpecError, match="dense gate"):
        mf.ResidualTree(levels=[mf.TreeLevel(experts=2, fanout=2)], router=mf.TreeRouter(gate="dense"),
                        aux_losses=[mf.SwitchLoadBalance()])


def test_dense_gate_fanout_rule_depends_on_conventions():
    with pytest.raises(mf.SpecError, match="fanout"):
        mf.ResidualTree(levels=[mf.TreeLevel(experts=4, fanout=2)], router=mf.TreeRouter(gate="dense"))
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=4, fanout=2)], router=mf.TreeRouter(gate="dense"),
                           conventions="official")
    assert tree.fanouts() == [4]


def test_presets_still_load():
    for name in ("smore", "smore_dense", "smore_noisy"):
        tree = mf.presets.load(name).sites[0].adapter
        assert tree.activation_position == "all" and tree.key_dims() == [32, 32]


def test_per_level_key_widths_and_down_dim_follow_the_spec():
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=2, rank=1, fanout=1, key_dim=3),
                                   mf.TreeLevel(experts=2, rank=1, fanout=1, key_dim=5)],
                           router=mf.TreeRouter(down_dim=None, key_dim=7))
    model, handle = compile_tree(tree, 6, 2, seed=0)
    decls = handle.graphs["proj"].param_decls
    assert decls["down_w"].shape == (6, 6)
    assert decls["keys0"].shape == (2, 3) and decls["keys1"].shape == (2, 5)
    assert decls["query0_w1"].shape == (3, 6 + 5) and decls["query1_w1"].shape == (5, 6)


@pytest.mark.parametrize("gate", ["switch", "dense", "noisy_topk"])
def test_no_tokens(gate):
    """An empty batch gives an empty output and a backward pass, in training and evaluation."""
    tree = mf.ResidualTree(levels=[mf.TreeLevel(experts=3, rank=2, fanout=3 if gate == "dense" else 2)] * 2,
                           router=mf.TreeRouter(gate=gate, down_dim=3, key_dim=2),
                           activation_position="child")
    model, _ = compile_tree(tree, 4, 3, seed=0)
    for training in (True, False):
        model.train(training)
        x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        y = model(x)
        assert y.shape == (0, 3)
        y.sum().backward()
