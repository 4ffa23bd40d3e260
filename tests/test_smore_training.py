"""Training mode of moleforge's S'MoRE: the noisy gate's noise comes from the user-seedable
generator (``handle.seed_noise``) exactly as documented, the smooth load of its CV² loss, and
the gradients of every parameter (the noise projection included) equal a float64 evaluation
of the same math by the interpreter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moleforge as mf
from conftest import assert_close
from smore_helpers import both_ways, compile_tree, trees


def _noisy(fanout: int = 2, conventions: str = "paper") -> mf.ResidualTree:
    levels = [mf.TreeLevel(experts=4, rank=2, fanout=fanout), mf.TreeLevel(experts=3, rank=2, fanout=fanout)]
    return mf.ResidualTree(levels=levels, router=mf.TreeRouter(gate="noisy_topk", down_dim=4, key_dim=3),
                           conventions=conventions, aux_losses=[mf.CV2ImportanceLoad(weight=0.1)])


def _site_out(handle, x, seed):
    handle.seed_noise(seed)
    delta, aux, routes = handle.modules["proj"].site(x)
    return delta.detach(), aux.detach(), routes["route"][0]


def test_noise_follows_the_seed():
    model, handle = compile_tree(_noisy(), 5, 3, seed=0)
    model.train()
    x = torch.randn(16, 5, dtype=torch.float64)
    a, b, c = _site_out(handle, x, 7), _site_out(handle, x, 7), _site_out(handle, x, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    model.eval()
    d, e = _site_out(handle, x, 7), _site_out(handle, x, 8)
    assert torch.equal(d[0], e[0]), "evaluation draws no noise"


def test_noise_changes_routing_and_weights():
    """The noise scale matters: with the noise projection at its zero init, std = softplus(0) + 0.01."""
    model, handle = compile_tree(_noisy(), 5, 3, seed=2)
    x = torch.randn(32, 5, dtype=torch.float64)
    model.eval()
    clean = _site_out(handle, x, 0)
    model.train()
    noisy = _site_out(handle, x, 0)
    assert not torch.equal(clean[0], noisy[0])


@given(fanout=st.sampled_from([1, 2]), conventions=st.sampled_from(["paper", "official"]),
       seed=st.integers(0, 2**16))
def test_noisy_training_equals_interpreter(fanout, conventions, seed):
    """Values, the smooth-load aux loss and every gradient, noise drawn as documented."""
    model, handle = compile_tree(_noisy(fanout, conventions), 5, 3, seed)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grad = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    (delta, aux, got), (out, ref_aux, want), names = both_ways(model, handle, x, grad, noise_seed=seed)
    assert_close(delta, out, "float64")
    assert_close(aux, ref_aux, "float64")
    for name, g, r in zip(names, got, want):
        assert_close(g, r, "float64", msg=f"gradient of {name}")
    noise_grads = [g for n, g in zip(names, got) if n.startswith("noise")]
    assert noise_grads and all(g.abs().max() > 0 for g in noise_grads), "the noise projection learns"


@pytest.mark.parametrize("passes", [(), None], ids=["plain", "default-pipeline"])
@given(tree=trees(), T=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_training_mode_equals_interpreter(passes, tree, T, seed):
    model, handle = compile_tree(tree, 4, 3, seed, passes=passes)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 4, generator=gen, dtype=torch.float64)
    grad = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    (delta, aux, got), (out, ref_aux, want), names = both_ways(model, handle, x, grad, noise_seed=seed + 1)
    assert_close(delta, out, "float64")
    if ref_aux is not None:
        assert_close(aux, ref_aux, "float64")
    for name, g, r in zip(names, got, want):
        assert_close(g, r, "float64", msg=f"gradient of {name}")


def test_a_training_step_runs_in_float32():
    """The default float32 adapter trains: loss with aux, backward, optimizer step, finite."""
    model, handle = compile_tree(_noisy(), 8, 6, seed=4, dtype=torch.float32)
    model.train()
    handle.seed_noise(0)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
    x = torch.randn(2, 10, 8)
    loss = model(x).pow(2).mean() + handle.modules["proj"].site(x.reshape(-1, 8))[1]
    loss.backward()
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in handle.trainable_parameters())


@pytest.mark.parametrize("start", ["b_zero", "w_final_zero"])
def test_each_start_is_a_no_op_with_the_named_factor_at_zero(start):
    """``start`` picks the zero factor: ``b_zero`` every ``B_l``, ``w_final_zero`` the final
    projection (the ``B_l`` then Kaiming-uniform, bound 1/√r); either way a fresh adapter leaves the
    model's output as it was, and a training step moves it."""
    from smore_helpers import Holder

    levels = [mf.TreeLevel(experts=4, rank=2, fanout=2), mf.TreeLevel(experts=3, rank=2, fanout=2)]
    tree = mf.ResidualTree(levels=levels,
                           router=mf.TreeRouter(down_dim=4, key_dim=3), start=start)
    model = Holder(8, 6, torch.float32)
    x = torch.randn(3, 8)
    before = model(x).detach()
    handle = mf.compile(mf.AdapterSpec(sites=[mf.Site(target=mf.Target(modules=["proj"]), adapter=tree)]), model)
    site = dict(handle.named_parameters())
    zero = ["proj.B0", "proj.B1"] if start == "b_zero" else ["proj.proj_w"]
    live = ["proj.proj_w"] if start == "b_zero" else ["proj.B0", "proj.B1"]
    assert all(site[k].abs().max() == 0 for k in zero)
    assert all(site[k].abs().min() > 0 for k in live)
    if start == "w_final_zero":
        assert site["proj.B0"].abs().max() <= 1 / 2 ** 0.5
    assert torch.equal(model(x).detach(), before)
    opt = torch.optim.Adam(handle.trainable_parameters(), lr=0.1)
    model(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(model(x).detach(), before)
