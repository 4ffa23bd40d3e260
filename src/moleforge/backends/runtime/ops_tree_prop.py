"""Bottom-up propagation of a residual tree (activation position ``all``) as one autograd
function with a hand-written backward.

Per pool ``l`` (``s`` experts of rank ``r``, output width ``d``), every token's tree nodes
``n`` (``N = C·f`` of them: context ``c``, position ``p``, expert ``e = idx[t, n]``) compute

    pre[t, n] = c_l (B_e h_{l,e}[t] + b_e) + W h_{l-1}[t, n] + w        (no W term at l = 0)
    a[t, n]   = act(pre[t, n])
    h_l[t, c] = Σ_p weight[t, c, p] · a[t, c·f + p]

The expert term is computed for all ``s`` experts at once, ``U = c_l B h + (c_l b + w)`` as
one batched GEMM ``(s, T, r) @ (s, r, d)`` (``T·s·r·d`` multiply-adds, the cost of the
up-projections of an ``s·r``-rank LoRA to width ``d``), then each node's row is gathered
from ``U`` with one ``index_select``; the backward scatters the node gradients back with
one ``index_add_``. Each pool is a handful of kernels forward and backward instead of the
few dozen autograd records of the generic form, and nothing of size ``(T, N, s·r)`` is
built. The semantics are those of ``ops_tree._propagate`` (and ``ir/interpret_tree.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cpu import tree_decode
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["propagate_all", "act_", "act_grad"]


def act_grad(activation: str, g: Tensor, a: Tensor) -> Tensor:
    """``∂L/∂pre`` from ``∂L/∂a`` and the saved output ``a = act(pre)`` (tanh, relu, identity)."""
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(g, a)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, a, 0)
    return g


def act_(activation: str, v: Tensor) -> Tensor:
    """``act(v)`` in place (tanh, relu, identity), for a fresh ``v`` nothing else reads."""
    if activation == "tanh":  # 2σ(2v) - 1: CPU sigmoid is several times faster than tanh
        return v.mul_(2).sigmoid_().mul_(2).sub_(1)
    if activation == "relu":
        return v.relu_()
    return v


class _PropagateAll(torch.autograd.Function):
    """Inputs: ``h_all (T, Σ s_l r_l)``, ``L``, ``activation``, ``scales`` (per pool), then per
    pool ``idx (T, C, f)``, ``weight (T, C, f)``, ``B (s, d, r)``, ``b (s, d) or None``,
    ``W (d, d_prev) or None``, ``w (d,) or None``. Output: the root hidden ``(T, C·d)``."""

    @staticmethod
    def forward(ctx, h_all: Tensor, L: int, activation: str, scales: tuple, *per_pool):  # type: ignore[override]
        root, saved = _propagate_forward(h_all, L, activation, scales, per_pool)
        ctx.L, ctx.activation, ctx.scales = L, activation, scales
        ctx.save_for_backward(*saved, *per_pool)
        return root

    @staticmethod
    def backward(ctx, g_root: Tensor):  # type: ignore[override]
        L, activation, scales = ctx.L, ctx.activation, ctx.scales
        saved = ctx.saved_tensors
        h_all = saved[0]
        per_pool = saved[1 + 3 * L:]
        T = h_all.shape[0]
        grads: list[Tensor | None] = [None] * len(per_pool)
        g_h_parts: list[Tensor] = []
        g_out = g_root
        for l in reversed(range(L)):
            flat, a, h_prev = saved[1 + 3 * l:4 + 3 * l]
            idx, weight, B, b, W, wb = per_pool[6 * l:6 * l + 6]
            s, d, r = B.shape
            C, f = idx.shape[1], idx.shape[2]
            scale = scales[l]
            av = a.view(T * C, f, d)
            go = g_out.reshape(T * C, 1, d)
            if ctx.needs_input_grad[5 + 6 * l]:
                grads[6 * l + 1] = (av * go).sum(-1).view(T, C, f)
            g_pre = act_grad(activation, weight.reshape(T * C, f, 1) * go, av).reshape(T * C * f, d)
            if l > 0 and W is not None:
                if ctx.needs_input_grad[8 + 6 * l]:
                    grads[6 * l + 4] = g_pre.T @ h_prev.reshape(T * C * f, -1)
                g_out = (g_pre @ W).view(T, C * f, -1)
            g_U = g_pre.new_zeros(s * T, d).index_add_(0, flat, g_pre).view(s, T, d)
            if b is not None or wb is not None:
                g_bias = g_U.sum(1)  # (s, d)
                if b is not None and ctx.needs_input_grad[7 + 6 * l]:
                    grads[6 * l + 3] = g_bias * scale if scale != 1.0 else g_bias
                if wb is not None and ctx.needs_input_grad[9 + 6 * l]:
                    grads[6 * l + 5] = g_bias.sum(0)
            off = sum(p.shape[0] * p.shape[2] for p in per_pool[2:6 * l:6])
            hl = h_all[:, off:off + s * r].reshape(T, s, r).transpose(0, 1)  # (s, T, r)
            if ctx.needs_input_grad[6 + 6 * l]:
                gB = torch.bmm(hl.transpose(1, 2), g_U).transpose(1, 2)  # (s, d, r)
                grads[6 * l + 2] = gB * scale if scale != 1.0 else gB
            if ctx.needs_input_grad[0]:
                Bs = B if scale == 1.0 else B * scale
                g_hT = torch.bmm(Bs.transpose(1, 2), g_U.transpose(1, 2))  # (s, r, T)
                g_h_parts.append(g_hT.permute(2, 0, 1).reshape(T, s * r))  # (T, s·r)
        g_h_all = torch.cat(g_h_parts[::-1], 1) if g_h_parts else None
        return (g_h_all, None, None, None, *grads)



def _propagate_forward(h_all: Tensor, L: int, activation: str, scales: tuple, per_pool) -> tuple[Tensor, list]:
    """The forward of :class:`_PropagateAll`: the root hidden ``(T, C·d)`` and the tensors its
    backward reads."""
    T = h_all.shape[0]
    saved: list[Tensor | None] = [h_all]
    off, h = 0, None
    for l in range(L):
        idx, weight, B, b, W, wb = per_pool[6 * l:6 * l + 6]
        s, d, r = B.shape
        C, f = idx.shape[1], idx.shape[2]
        scale = scales[l]
        hl = h_all[:, off:off + s * r].reshape(T, s, r).transpose(0, 1)  # (s, T, r)
        off += s * r
        Bt = B.transpose(1, 2) if scale == 1.0 else B.transpose(1, 2) * scale  # (s, r, d)
        U = torch.bmm(hl, Bt)  # (s, T, d)
        bias = _node_bias(b, wb, scale, s, d, U)
        if bias is not None:
            U += bias.unsqueeze(1)
        flat = _expert_major(idx, T)  # (T·N,) rows of U viewed (s·T, d)
        pre = U.view(s * T, d).index_select(0, flat)  # (T·N, d)
        if l > 0 and W is not None:
            pre = torch.addmm(pre, h.reshape(T * C * f, -1), W.T)
        a = act_(activation, pre)
        out = (weight.reshape(T * C, f, 1) * a.view(T * C, f, d)).sum(1)  # (T·C, d)
        saved += [flat, a, h if l > 0 else None]
        h = out.view(T, C, d)
    return h.reshape(T, -1), saved

def _node_bias(b: Tensor | None, wb: Tensor | None, scale: float, s: int, d: int, like: Tensor) -> Tensor | None:
    """``c·b_e + w`` per expert ``(s, d)`` (``None`` when neither bias exists)."""
    if b is None and wb is None:
        return None
    bias = like.new_zeros(s, d) if b is None else (b * scale if scale != 1.0 else b)
    return bias + wb if wb is not None else bias


def _expert_major(idx: Tensor, T: int) -> Tensor:
    """Row of each tree node in ``U`` viewed ``(s·T, d)``: ``e·T + t``, token-major ``(T·N,)``."""
    t = torch.arange(T, device=idx.device).unsqueeze(1)
    return (idx.reshape(T, -1) * T + t).reshape(-1)


def propagate_all(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str,
                  policy: KernelPolicy = TORCH_OPS) -> Tensor:
    """Root hidden ``(T, d_L)`` of the ``all``-position propagation (see the module doc);
    ``levels`` per pool ``(B (s, d, r), b or None, W or None, w or None, scale)``. Each level's
    node step runs in the Triton kernel when ``policy.tree_kernel`` chooses it for ``h_all``; without
    autograd at decode sizes, the whole propagation in the CPU kernel where ``policy.decode_kernel``
    chooses it."""
    if policy.tree_kernel(h_all.device, h_all.dtype) == "triton":
        return _propagate_triton(h_all, indices, weights, levels, activation)
    per_pool: list = []
    for idx, w, (B, b, W, wb, _) in zip(indices, weights, levels):
        per_pool += [idx, w, B, b, W, wb]
    scales = tuple(float(lv[4]) for lv in levels)
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # nothing to save for a backward
        if policy.decode_kernel(h_all.device, h_all.dtype, h_all.shape[0]) == "cpu":
            return tree_decode.propagate(h_all, indices, weights, levels, activation)
        return _propagate_forward(h_all, len(levels), activation, scales, per_pool)[0]
    return _PropagateAll.apply(h_all, len(levels), activation, scales, *per_pool)


def _propagate_triton(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str) -> Tensor:
    """:func:`propagate_all` with each level's gather, activation and mix in the Triton node
    kernel (``backends/triton/tree.py``); the GEMMs stay torch ops and autograd composes them."""
    from ..triton.tree import node_mix

    T = h_all.shape[0]
    off, h = 0, None
    for l, (idx, weight, (B, b, W, wb, scale)) in enumerate(zip(indices, weights, levels)):
        s, d, r = B.shape
        C, f = idx.shape[1], idx.shape[2]
        hl = h_all[:, off:off + s * r].reshape(T, s, r).transpose(0, 1)  # (s, T, r)
        off += s * r
        U = torch.bmm(hl, B.transpose(1, 2) * scale)  # (s, T, d)
        bias = _node_bias(b, wb, scale, s, d, U)
        if bias is not None:
            U = U + bias.unsqueeze(1)
        v = h.reshape(T * C * f, -1) @ W.T if l > 0 and W is not None else None  # (T·C·f, d)
        h = node_mix(U.reshape(s * T, d), _expert_major(idx, T), v, weight.reshape(-1), f, activation)
        h = h.view(T, C, d)
    return h.reshape(T, -1)
