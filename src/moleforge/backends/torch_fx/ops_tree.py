"""Runtime ops of S'MoRE residual trees: vectorised top-down routing, and bottom-up
propagation that computes every expert's residual once and gathers per tree node
(METHODS.md §20.7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["tree_route", "tree_down", "tree_propagate", "tree_aux"]


def _act(name: str, v: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(v)
    if name == "relu":
        return torch.relu(v)
    return v


def tree_route(xd: Tensor, levels: list, fanouts: list[int], gate: str, conventions: str,
               query_activation: str, temperature: float, training: bool,
               generator: torch.Generator | None = None):
    """Route all tokens top-down.

    Args:
        xd: ``(T, m)`` router input.
        levels: per pool ``(keys (s, g), w1, b1, w2, b2, noise or None)``, pool 0 first.
    Returns:
        ``(indices, weights, probs)``, tuples over pools of ``(T, F_{l+1}, f_l)``,
        ``(T, F_{l+1}, f_l)`` and ``(T, F_{l+1}, s_l)``.
    """
    L = len(levels)
    T = xd.shape[0]
    z = xd.unsqueeze(1)  # (T, 1, m): one context per token at the top
    idx_out: list = [None] * L
    w_out: list = [None] * L
    p_out: list = [None] * L
    official = conventions == "official"
    for l in reversed(range(L)):
        keys, w1, b1, w2, b2, noise = levels[l]
        s, f = keys.shape[0], fanouts[l]
        C = z.shape[1]
        q = F.linear(_act(query_activation, F.linear(z, w1, b1)), w2, b2)  # (T, C, g)
        if gate == "noisy_topk":
            kvec = F.normalize(keys, dim=-1, eps=1e-12)  # (s, g)
            logits = F.normalize(q, dim=-1, eps=1e-12) @ kvec.T / temperature  # (T, C, s)
            if training and noise is not None:
                std = F.softplus(F.linear(z, noise)) + 0.01  # (T, C, s)
                eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
                logits = logits + eps * std
        else:
            kvec = keys
            logits = q @ keys.T / temperature  # (T, C, s)
        probs = torch.softmax(logits, dim=-1)  # (T, C, s)
        if gate == "dense":
            index = torch.arange(s, device=xd.device).expand(T, C, s)  # (T, C, s)
            weights = probs
        elif gate == "switch":
            top, index = probs.topk(f, dim=-1)  # (T, C, f)
            weights = top if (official and f == 1) else top / top.sum(-1, keepdim=True)
        else:
            top, index = logits.topk(f, dim=-1)  # (T, C, f)
            weights = top if (official and f == 1) else torch.softmax(top, dim=-1)
        idx_out[l], w_out[l], p_out[l] = index, weights, probs
        if l > 0:
            fl = index.shape[-1]
            chosen = kvec[index]  # (T, C, f, g)
            z = torch.cat([z.unsqueeze(2).expand(T, C, fl, z.shape[-1]), chosen], dim=-1)  # (T, C, f, in+g)
            z = z.reshape(T, C * fl, -1)  # (T, C*f, in+g): children of context c at c*f + p
    return tuple(idx_out), tuple(w_out), tuple(p_out)


def tree_down(x: Tensor, a_list: list[Tensor], a_bias: list[Tensor | None]) -> Tensor:
    """Per-pool down-projections, concatenated: ``(T, Σ_l s_l r_l)`` (the unfused form)."""
    outs = []
    for a, ab in zip(a_list, a_bias):
        s, r, d = a.shape
        h = F.linear(x, a.reshape(s * r, d))  # (T, s*r)
        outs.append(h + ab.reshape(s * r) if ab is not None else h)
    return torch.cat(outs, dim=-1)


def tree_propagate(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str) -> Tensor:
    """Bottom-up propagation from all down-projections ``h_all (T, Σ s_l r_l)``.

    ``levels``: per pool ``(B (s, d_{l+1}, r), b_bias, W or None, W_bias, scale)``.
    Every expert's residual ``u_{l,n}`` is computed once per token (a batched GEMM over
    experts), then gathered by the routing indices: duplicated tree nodes cost nothing.
    """
    T = h_all.shape[0]
    ar = torch.arange(T, device=h_all.device)[:, None, None]  # (T, 1, 1)
    off = 0
    h = None
    for l, (B, b_bias, W, W_bias, scale) in enumerate(levels):
        s, dn, r = B.shape
        down = h_all[:, off:off + s * r].reshape(T, s, r).transpose(0, 1)  # (s, T, r)
        off += s * r
        u = torch.bmm(down, B.transpose(1, 2)).transpose(0, 1)  # (T, s, dn)
        if b_bias is not None:
            u = u + b_bias
        if scale != 1.0:
            u = u * scale
        idx, w = indices[l], weights[l]  # (T, C, f)
        C, f = idx.shape[1], idx.shape[2]
        sel = u[ar, idx]  # (T, C, f, dn)
        if W is not None:
            child = h.reshape(T, C, f, h.shape[-1])  # (T, C, f, d_l)
            sel = sel + F.linear(child, W, W_bias)  # (T, C, f, dn)
        h = (w.unsqueeze(-1) * _act(activation, sel)).sum(2)  # (T, C, dn)
    return h.reshape(T, -1)  # (T, d_L): one root context


def _cv2(v: Tensor) -> Tensor:
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10) if v.numel() > 1 else v.sum() * 0.0


def tree_aux(indices: tuple, weights: tuple, probs: tuple, kind: str, weight: float) -> Tensor:
    """Sum over pools of the switch load balance or the CV² importance+load loss."""
    total = probs[0].new_zeros(())
    for idx, w, p in zip(indices, weights, probs):
        T, C, f = idx.shape
        s = p.shape[-1]
        if kind == "switch_lb":
            if f == s:
                continue  # a dense pool carries no balance loss
            counts = torch.bincount(idx.reshape(-1), minlength=s).to(p.dtype)  # (s,)
            total = total + weight * s * torch.sum(counts / (T * C) * p.reshape(-1, s).mean(0))
        else:
            dense = p.new_zeros(T * C, s).scatter(1, idx.reshape(T * C, f), w.reshape(T * C, f))
            total = total + weight * (_cv2(dense.sum(0)) + _cv2((dense > 0).to(p.dtype).sum(0)))
    return total
