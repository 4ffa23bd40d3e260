"""Runtime ops of S'MoRE residual trees: vectorised top-down routing, bottom-up
propagation that computes every expert's residual once per token (METHODS.md §20.7),
and the tree aux losses. The semantics are those of ``ir/interpret_tree.py``.

Shapes: ``T`` tokens; pool l routes ``C_l = Π_{j>l} f_j`` contexts per token, each
picking ``f_l`` of ``s_l`` experts; context ``c`` with position ``p`` becomes context
``c·f_l + p`` of pool l-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TreeRouting", "tree_route", "tree_down", "tree_propagate", "tree_aux"]


class TreeRouting(tuple):
    """``(indices, weights, probs)``, tuples over pools of ``(T, C_l, f_l)``, ``(T, C_l, f_l)``
    and ``(T, C_l, s_l)``; ``gate`` names the gate and ``smooth_load`` holds, per pool, the
    training-mode smooth load ``(s_l,)`` of the noisy gate (``None`` elsewhere)."""

    def __new__(cls, parts=(), gate: str = "switch", smooth_load: tuple = ()):
        self = super().__new__(cls, parts)
        self.gate = gate
        self.smooth_load = tuple(smooth_load)
        return self


def _act(name: str, v: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(v)
    if name == "relu":
        return torch.relu(v)
    return v


def tree_route(xd: Tensor, levels: list, fanouts: list[int], gate: str, conventions: str,
               query_activation: str, temperature: float, training: bool,
               generator: torch.Generator | None = None) -> TreeRouting:
    """Route all tokens top-down (see :class:`~moleforge.ir.nodes.TreeRoute`).

    The query MLP's first layer reads ``z = [x_down, ancestor keys]``; it is applied
    blockwise, ``W1 z = W1[:, :m] x_down + Σ_j (K_j W1[:, slot_j]ᵀ)[e_j]``: one GEMM on the
    tokens plus a gather from an ``(s_j, g)`` table per ancestor, no ``(T, C, in_l)``
    router input is built. For switch/dense, ``K (W2 h + b2) = (K W2) h + K b2``. The
    noisy gate's noise projection rides in the same GEMM as extra output rows.

    Args:
        xd: ``(T, m)`` router input.
        levels: per pool ``(keys (s, g), w1 (g, in_l), b1, w2, b2, noise (s, in_l) or None)``.
        fanouts: ``f_l`` per pool (``s_l`` for the dense gate).
        generator: draws the training noise ``ε``, pool by pool from the top, ``(T, C_l, s_l)``.
    """
    L, (T, m) = len(levels), xd.shape
    noisy, official = gate == "noisy_topk", conventions == "official"
    kvec = [F.normalize(lv[0], dim=-1, eps=1e-12) if noisy else lv[0] for lv in levels]
    ancestors: list[tuple[int, Tensor]] = []  # (pool j, its chosen expert per current context (T, C))
    idx_out: list = [None] * L
    w_out: list = [None] * L
    p_out: list = [None] * L
    loads: list = [None] * L
    for l in reversed(range(L)):
        keys, w1, b1, w2, b2, noise = levels[l]
        s, g = keys.shape
        f = fanouts[l]
        with_noise = training and noisy and noise is not None
        w_in, b_in = (torch.cat([w1, noise]), torch.cat([b1, b1.new_zeros(s)])) if with_noise else (w1, b1)
        pre = F.linear(xd, w_in[:, :m], b_in).unsqueeze(1)  # (T, 1, g [+ s])
        off = m
        for j, e in ancestors:
            gj = kvec[j].shape[1]
            pre = pre + F.embedding(e, kvec[j] @ w_in[:, off:off + gj].T)  # (T, C, g [+ s])
            off += gj
        h = _act(query_activation, pre[..., :g] if with_noise else pre)  # (T, C, g)
        if noisy:
            clean = F.normalize(F.linear(h, w2, b2), dim=-1, eps=1e-12) @ kvec[l].T  # (T, C, s)
        else:
            clean = F.linear(h, keys @ w2, keys @ b2)  # (T, C, s)
        if temperature != 1.0:
            clean = clean / temperature
        logits, std = clean, None
        if with_noise:
            std = F.softplus(pre[..., g:]) + 0.01  # (T, C, s)
            eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
            logits = clean + eps * std
        probs = torch.softmax(logits, dim=-1)  # (T, C, s)
        C = probs.shape[1]
        raw = official and f == 1
        if gate == "dense":
            index = torch.arange(s, device=xd.device).expand(T, C, s)
            weights = probs
        elif gate == "switch":
            top, index = probs.topk(f, dim=-1)  # (T, C, f)
            weights = top if raw else top / top.sum(-1, keepdim=True)
        else:
            smooth = std is not None and f < s
            top, index = logits.topk(f + 1 if smooth else f, dim=-1)
            if smooth:
                loads[l] = _smooth_load(clean, logits, std, top, f)
                top, index = top[..., :f], index[..., :f]
            weights = top if raw else torch.softmax(top, dim=-1)
        idx_out[l], w_out[l], p_out[l] = index, weights, probs
        if l > 0:
            fl = index.shape[-1]
            ancestors = [(j, e.repeat_interleave(fl, dim=1)) for j, e in ancestors]
            ancestors.append((l, index.reshape(T, C * fl)))
    return TreeRouting((tuple(idx_out), tuple(w_out), tuple(p_out)), gate, tuple(loads))


def _smooth_load(clean: Tensor, noisy: Tensor, std: Tensor, top: Tensor, f: int) -> Tensor:
    """Shazeer's smooth load ``(s,)``: for each expert the probability, over a fresh noise
    draw, of being selected given the other experts' noisy logits."""
    thr_in, thr_out = top[..., f:f + 1], top[..., f - 1:f]  # (f+1)-th and f-th noisy logit
    p_in = torch.special.ndtr((clean - thr_in) / std)
    p_out = torch.special.ndtr((clean - thr_out) / std)
    return torch.where(noisy > thr_in, p_in, p_out).sum((0, 1))


def tree_down(x: Tensor, a_list: list[Tensor], a_bias: list[Tensor | None]) -> Tensor:
    """Every pool's and expert's down-projection in one GEMM: ``(T, Σ_l s_l r_l)``,
    pool-major, expert-major, ``A_{l,n} x + a_{l,n}``."""
    d = x.shape[-1]
    A = torch.cat([a.reshape(-1, d) for a in a_list]) if len(a_list) > 1 else a_list[0].reshape(-1, d)
    if any(ab is None for ab in a_bias):
        return F.linear(x, A)
    bias = torch.cat([ab.reshape(-1) for ab in a_bias]) if len(a_bias) > 1 else a_bias[0].reshape(-1)
    return F.linear(x, A, bias)


def _residuals(h: Tensor, B: Tensor, b_bias: Tensor | None, scale: float) -> Tensor:
    """``u = c (B_n h_n + b_n)`` for every expert at once: ``h (T, s·r)`` times the block
    diagonal of the ``B_nᵀ`` (one GEMM) -> ``(T, s, d)``."""
    s, d, r = B.shape
    M = torch.block_diag(*B.transpose(1, 2).unbind(0)) if s > 1 else B[0].T  # (s·r, s·d)
    bias = None if b_bias is None else b_bias.reshape(-1)
    if scale != 1.0:
        M = M * scale
        bias = None if bias is None else bias * scale
    u = torch.addmm(bias, h, M) if bias is not None else h @ M
    return u.view(h.shape[0], s, d)


def tree_propagate(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str,
                   position: str = "all") -> Tensor:
    """Bottom-up propagation from all down-projections ``h_all (T, Σ s_l r_l)``; returns the
    root hidden ``(T, d_L)``.

    ``levels``: per pool ``(B (s, d_{l+1}, r), b_bias, W or None, W_bias, scale)``. Every
    expert's residual is computed once per token, so duplicated tree nodes cost nothing.
    At the leaves the message does not depend on the node: each node is the batched
    product of its dense gate row ``(C, s)`` with the activated residuals ``(s, d_1)``.
    """
    T = h_all.shape[0]
    off, h = 0, h_all
    for l, (B, b_bias, W, W_bias, scale) in enumerate(levels):
        s, dn, r = B.shape
        u = _residuals(h_all[:, off:off + s * r], B, b_bias, scale)  # (T, s, dn)
        off += s * r
        idx, w = indices[l], weights[l]  # (T, C, f)
        C, f = idx.shape[1], idx.shape[2]
        if l == 0:
            gates = w.new_zeros(T, C, s).scatter(2, idx, w)  # (T, C, s)
            h = torch.bmm(gates, _act(activation, u) if position == "all" else u)  # (T, C, dn)
            continue
        u_sel = u.gather(1, idx.reshape(T, C * f, 1).expand(T, C * f, dn))  # (T, C·f, dn)
        wrow = w.reshape(T * C, 1, f)
        if position == "child":
            kids = _act(activation, h).reshape(T, C, f, -1).sum(2)  # (T, C, d_l)
            own = torch.bmm(wrow, u_sel.reshape(T * C, f, dn)).reshape(T, C, dn)
            h = own + F.linear(kids, W, None if W_bias is None else W_bias * f)
            continue
        child = h if position == "all" else _act(activation, h)  # (T, C·f, d_l)
        msg = F.linear(child, W, W_bias) + u_sel  # (T, C·f, dn)
        if position == "all":
            msg = _act(activation, msg)
        h = torch.bmm(wrow, msg.reshape(T * C, f, dn)).reshape(T, C, dn)
    return h.reshape(T, -1)  # one root context


def _cv2(v: Tensor) -> Tensor:
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10) if v.numel() > 1 else v.sum() * 0.0


def tree_aux(route: TreeRouting, kind: str, weight: float) -> Tensor:
    """Sum over pools of the switch load balance or the CV² importance + load loss
    (training noisy gate: the smooth load). Dense trees carry none (zero)."""
    indices, weights, probs = route[0], route[1], route[2]
    total = probs[0].new_zeros(())
    if route.gate == "dense":
        return total
    smooth = route.smooth_load or (None,) * len(indices)
    for idx, w, p, load in zip(indices, weights, probs, smooth):
        T, C, f = idx.shape
        s = p.shape[-1]
        flat = idx.reshape(-1)
        if kind == "switch_lb":
            counts = torch.bincount(flat, minlength=s).to(p.dtype)  # (s,)
            total = total + (weight * s / (T * C)) * (counts @ p.reshape(-1, s).mean(0))
        else:
            importance = p.new_zeros(s).index_add(0, flat, w.reshape(-1))
            if load is None:
                load = torch.bincount(flat[w.reshape(-1) > 0], minlength=s).to(p.dtype)
            total = total + weight * (_cv2(importance) + _cv2(load))
    return total
