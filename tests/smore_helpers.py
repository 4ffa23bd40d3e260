"""Shared pieces of the S'MoRE tests: random trees covering every option (``strategies.trees``), a one-linear model,
and one forward/backward through moleforge and through the float64 interpreter with the same
routing and the same training noise."""

from __future__ import annotations

import math

import torch
from torch import nn

import moleforge as mf
from moleforge.ir import interpret
from strategies import make_params, trees  # noqa: F401  (trees: re-exported for the S'MoRE tests)


class Holder(nn.Module):
    """A model holding one linear (the adapted site)."""

    def __init__(self, d_in: int, d_out: int, dtype=torch.float64):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def compile_tree(tree: mf.ResidualTree, d_in: int, d_out: int, seed: int, dtype=torch.float64, passes=()):
    """``(model, handle)`` with every adapter tensor random and non-zero."""
    model = Holder(d_in, d_out, dtype)
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(modules=["proj"]), adapter=tree)])
    handle = mf.compile(spec, model, passes=passes)  # the tree runtime on the plain IR (passes tested apart)
    graph = handle.graphs["proj"]
    handle.load_state_dict({f"proj.{k}": v for k, v in make_params(graph, seed).items()})
    return model, handle


def contexts(tree: mf.ResidualTree) -> list[int]:
    """``C_l``, the contexts pool l routes per token."""
    fan = tree.fanouts()
    return [math.prod(fan[l + 1:]) for l in range(len(fan))]


def draw_noise(tree: mf.ResidualTree, T: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    """The training noise as documented: standard normal ``(T, C_l, s_l)`` per pool, drawn pool
    by pool from the top from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    C = contexts(tree)
    eps: list = [None] * len(tree.levels)
    for l in reversed(range(len(tree.levels))):
        eps[l] = torch.randn((T, C[l], tree.levels[l].experts), generator=gen, dtype=dtype)
    return tuple(eps)


def both_ways(model: Holder, handle, x: torch.Tensor, grad: torch.Tensor, *, noise_seed: int | None = None):
    """Value, aux and gradients (x and every parameter) from moleforge and from the float64
    interpreter, the interpreter following moleforge's routing (and training noise)."""
    site = handle.modules["proj"].site
    graph = handle.graphs["proj"]
    if noise_seed is not None:
        handle.seed_noise(noise_seed)
    names = [d.name for d in graph.params if d.trainable]
    xs = x.clone().requires_grad_()
    delta, aux, routes = site(xs)
    loss = (delta * grad).sum() + (aux if aux is not None else 0.0)
    got = torch.autograd.grad(loss, [xs] + [getattr(site, n) for n in names], allow_unused=True)
    tree = handle.spec.sites[0].adapter
    noisy = site.training and tree.router.gate == "noisy_topk"
    noise = {"route": draw_noise(tree, x.shape[0], noise_seed)} if noisy else None
    params = {d.name: getattr(site, d.name).detach().double().requires_grad_(d.trainable)
              for d in graph.params}
    xi = x.double().clone().requires_grad_()
    res = interpret(graph, params, xi, routing={"route": routes["route"][0]}, noise=noise)
    ref_loss = (res.output * grad.double()).sum() + res.aux_total
    ref = torch.autograd.grad(ref_loss, [xi] + [params[n] for n in names], allow_unused=True)
    fill = [xs] + [getattr(site, n) for n in names]
    got = [g if g is not None else torch.zeros_like(t) for g, t in zip(got, fill)]
    ref = [g if g is not None else torch.zeros_like(t, dtype=torch.float64) for g, t in zip(ref, fill)]
    return (delta, aux, got), (res.output, res.aux_total if graph.aux else None, ref), ["x"] + names
