"""One residual-tree level's node step as Triton kernels behind a ``torch.library`` custom op.

Per routed context ``q`` (``Q = T·C``) with ``f`` child nodes ``n = q·f + p``:

    a[n]   = act(u[flat[n]] + v[n])          u (s·T, d): every expert's term for every token
    out[q] = Σ_p weight[n] · a[n]            v (Q·f, d): the children's transform, or none

the gather, activation and weighted mix of ``ops_tree_prop`` in one kernel, with ``a`` kept
for the backward; the backward kernel gives ``∂weight``, ``∂pre`` (which is ``∂v``) and
scatters ``∂pre`` into ``∂u`` with atomic adds. The GEMMs around it (every expert's
up-projection, the children's transform) stay torch ops. Layers: kernels
(``tree_kernels.py``) -> launchers, which validate their inputs -> custom ops
``moleforge::tree_node_mix`` (and its backward) with fake and autograd registrations ->
``ops_tree_prop.propagate_all``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import check_device
from . import tree_kernels as kernels

__all__ = ["node_mix", "check_inputs"]

BLOCK_Q, BLOCK_D = 16, 32
ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}


def check_inputs(u: Tensor, flat: Tensor, v: Tensor | None, weight: Tensor, f: int, activation: str) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype or device does not fit."""

    def bad(name: str, t: Tensor, want: str) -> ValueError:
        return ValueError(f"tree_node_mix: {name} has shape {tuple(t.shape)}, dtype {t.dtype}, device "
                          f"{t.device}; expected {want}")

    if activation not in ACTIVATIONS:
        raise ValueError(f"tree_node_mix: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not isinstance(f, int) or f < 1:
        raise ValueError(f"tree_node_mix: fanout f={f!r}; expected a positive int")
    if u.dim() != 2 or not u.is_floating_point():
        raise bad("u", u, "a floating (experts·tokens, d) matrix")
    if flat.dim() != 1 or flat.dtype != torch.int64 or flat.shape[0] % f:
        raise bad("flat", flat, f"int64 of shape (nodes,), nodes a multiple of the fanout {f}")
    N = flat.shape[0]
    if weight.shape != (N,) or weight.dtype != u.dtype:
        raise bad("weight", weight, f"{u.dtype} of shape ({N},), one weight per node")
    if v is not None and (v.shape != (N, u.shape[1]) or v.dtype != u.dtype):
        raise bad("v", v, f"{u.dtype} of shape ({N}, {u.shape[1]})")
    for name, t in (("flat", flat), ("weight", weight), ("v", v)):
        if t is not None and t.device != u.device:
            raise bad(name, t, f"a tensor on {u.device}, the device of u")


def _grid(Q: int, D: int) -> tuple[int, int]:
    return triton.cdiv(Q, BLOCK_Q), triton.cdiv(D, BLOCK_D)


@torch.library.custom_op("moleforge::tree_node_mix", mutates_args=())
def _node_mix(u: Tensor, flat: Tensor, v: Tensor | None, weight: Tensor, f: int,
              activation: str) -> tuple[Tensor, Tensor]:
    u, flat, weight = u.contiguous(), flat.contiguous(), weight.contiguous()
    v = None if v is None else v.contiguous()
    N, D = flat.shape[0], u.shape[1]
    a, out = u.new_empty(N, D), u.new_empty(N // f, D)
    if N and D:
        kernels.node_mix_kernel[_grid(N // f, D)](u, flat, v if v is not None else u, weight, a, out, N // f, D,
                                                  F=f, HAS_V=v is not None, ACT=ACTIVATIONS[activation],
                                                  BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D)
    return out, a


@_node_mix.register_fake
def _(u, flat, v, weight, f, activation):
    N, D = flat.shape[0], u.shape[1]
    return u.new_empty(N // f, D), u.new_empty(N, D)


@torch.library.custom_op("moleforge::tree_node_mix_backward", mutates_args=())
def _node_mix_backward(g_out: Tensor, a: Tensor, flat: Tensor, weight: Tensor, rows_u: int, f: int,
                       activation: str) -> tuple[Tensor, Tensor, Tensor]:
    g_out = g_out.contiguous()
    N, D = a.shape
    g_u, g_pre, g_weight = a.new_zeros(rows_u, D), a.new_empty(N, D), a.new_zeros(N)
    if N and D:
        kernels.node_mix_backward_kernel[_grid(N // f, D)](g_out, a, flat, weight, g_u, g_pre, g_weight, N // f, D,
                                                           F=f, ACT=ACTIVATIONS[activation],
                                                           BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D)
    return g_u, g_pre, g_weight


@_node_mix_backward.register_fake
def _(g_out, a, flat, weight, rows_u, f, activation):
    return a.new_empty(rows_u, a.shape[1]), a.new_empty(a.shape), a.new_empty(a.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    u, flat, v, weight, f, activation = inputs
    ctx.save_for_backward(output[1], flat, weight)
    ctx.rows_u, ctx.f, ctx.activation, ctx.has_v = u.shape[0], f, activation, v is not None


def _backward(ctx, g_out: Tensor, g_a: Tensor | None):
    a, flat, weight = ctx.saved_tensors
    if g_out is None:
        g_out = a.new_zeros(a.shape[0] // ctx.f, a.shape[1])
    g_u, g_pre, g_weight = _node_mix_backward(g_out, a, flat, weight, ctx.rows_u, ctx.f, ctx.activation)
    return g_u, None, g_pre if ctx.has_v else None, g_weight, None, None


_node_mix.register_autograd(_backward, setup_context=_setup_context)


def node_mix(u: Tensor, flat: Tensor, v: Tensor | None, weight: Tensor, f: int, activation: str) -> Tensor:
    """``out (Q, d)`` of the module docstring; ``flat (Q·f,)`` int64 rows of ``u``, ``weight
    (Q·f,)``. Row indices are not range-checked on the device (that would synchronise)."""
    check_inputs(u, flat, v, weight, f, activation)
    check_device("tree_node_mix", u)
    return _node_mix(u, flat, v, weight, f, activation)[0]
