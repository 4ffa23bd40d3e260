"""Reference semantics of S'MoRE residual trees (part of the interpreter): routing,
propagation and aux losses, token by token and context by context, in float64.

A tree routing is a :class:`~moleforge.ir.values.TreeRouting`: per pool ``indices``/``weights``
``(T, C_l, f_l)``, ``probs`` ``(T, C_l, s_l)``, ``smooth_load`` (``(s_l, T·C_l)`` or ``None``), and
the ``gate``. Context ``c`` of pool l+1 with position ``p`` is context ``c·f_{l+1} + p`` of pool l.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .nodes import AuxLoss, TreePropagate, TreeRoute
from .values import TreeRouting

__all__ = ["tree_route", "tree_mix", "tree_aux", "stable_top"]

F64 = torch.float64


def stable_top(scores: Tensor, k: int) -> tuple[Tensor, float]:
    """Indices of the k largest (ties to the lower index) and the selection margin."""
    scores = scores.detach()
    order = torch.sort(scores, descending=True, stable=True).indices
    margin = math.inf if k >= scores.numel() else float(scores[order[k - 1]] - scores[order[k]])
    return order[:k], margin


def _act(name: str, v: Tensor) -> Tensor:
    return torch.tanh(v) if name == "tanh" else torch.relu(v) if name == "relu" else v


def _unit(v: Tensor) -> Tensor:
    return v / torch.clamp(v.norm(dim=-1, keepdim=True), min=1e-12)


def _gate(n: TreeRoute, l: int, z: Tensor, p, fixed_sel, eps: Tensor | None) -> dict:
    """One context at pool l: selected experts, their weights, all probabilities, the
    selection margin and (training, noisy gate) the smooth load of this context."""
    lv = n.levels[l]
    h = _act(n.query_activation, p[lv.w1.name] @ z + p[lv.b1.name])
    q = p[lv.w2.name] @ h + p[lv.b2.name]
    K = p[lv.keys.name]
    clean = (_unit(K) @ _unit(q) if n.gate == "noisy_topk" else K @ q) / n.temperature
    logits, std = clean, None
    if n.gate == "noisy_topk" and eps is not None and lv.noise is not None:
        std = F.softplus(p[lv.noise.name] @ z) + 0.01
        logits = clean + eps * std
    probs = torch.softmax(logits, 0)
    out = {"probs": probs, "margin": math.inf, "load": None}
    if n.gate == "dense":
        return out | {"sel": torch.arange(lv.experts), "w": probs}
    score = probs if n.gate == "switch" else logits
    if fixed_sel is not None:
        sel, margin = torch.as_tensor(fixed_sel), math.inf
    else:
        sel, margin = stable_top(score, lv.fanout)
    f, raw = lv.fanout, n.conventions == "official" and lv.fanout == 1
    if n.gate == "switch":
        w = probs[sel] if raw else probs[sel] / probs[sel].sum()
    else:
        w = logits[sel] if raw else torch.softmax(logits[sel], 0)
    if std is not None and f < lv.experts:
        chosen = torch.zeros(lv.experts, dtype=torch.bool)
        chosen[sel] = True
        thr_in, thr_out = logits[~chosen].max(), logits[sel].min()
        normal = torch.distributions.Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64))
        out["load"] = torch.where(chosen, normal.cdf((clean - thr_in) / std),
                                  normal.cdf((clean - thr_out) / std))
    return out | {"sel": sel, "w": w, "margin": margin}


def tree_route(n: TreeRoute, xd: Tensor, p, fixed, noise) -> tuple[TreeRouting, float]:
    """Route every token top-down. ``fixed``: imposed indices per pool ``(T, C_l, f_l)``;
    ``noise``: training-mode ``ε`` per pool ``(T, C_l, s_l)`` (``None``: evaluation). Returns
    the routing and the smallest selection margin."""
    L = len(n.levels)
    idx, wts, probs = ([[] for _ in range(L)] for _ in range(3))
    loads: list = [[] for _ in range(L)]  # per pool, the smooth load of each (token, context)
    margin = math.inf
    for t in range(xd.shape[0]):
        contexts = [xd[t]]  # router inputs of the contexts at the current pool, in context order
        for l in reversed(range(L)):
            K = p[n.levels[l].keys.name]
            rows, nxt = [], []
            for c, z in enumerate(contexts):
                g = _gate(n, l, z, p, None if fixed is None else fixed[l][t][c],
                          None if noise is None else noise[l][t, c].to(F64))
                margin = min(margin, g["margin"])
                rows.append(g)
                if g["load"] is not None:
                    loads[l].append(g["load"])
                for e in g["sel"].tolist():
                    nxt.append(torch.cat([z, _unit(K[e]) if n.gate == "noisy_topk" else K[e]]))
            idx[l].append(torch.stack([g["sel"] for g in rows]))
            wts[l].append(torch.stack([g["w"] for g in rows]))
            probs[l].append(torch.stack([g["probs"] for g in rows]))
            contexts = nxt
    smooth = tuple(torch.stack(load, 1) if load else None for load in loads)  # (s_l, T·C_l)
    routing = TreeRouting(tuple(torch.stack(i) for i in idx), tuple(torch.stack(w) for w in wts),
                          tuple(torch.stack(q) for q in probs), n.gate, smooth)
    return routing, margin


def tree_mix(n, src: Tensor, route: TreeRouting, p) -> Tensor:
    """Bottom-up propagation, token by token (see :class:`~moleforge.ir.nodes.TreeMix`)."""
    offsets, off = [], 0
    for lv in n.levels:
        offsets.append(off)
        off += lv.b.shape[0] * lv.b.shape[2]
    tok = _Token(n, p, route, offsets)
    return torch.stack([tok.node(t, src[t], len(n.levels) - 1, 0) for t in range(src.shape[0])])


class _Token:
    """The tree of one token."""

    def __init__(self, n, p, route: TreeRouting, offsets: list[int]):
        self.n, self.p, self.route, self.offsets = n, p, route, offsets

    def residual(self, x: Tensor, l: int, e: int) -> Tensor:
        """``u_{l,e} = c_l (B (A x + a) + b)``; ``x`` is the token (TreeMix) or its
        down-projections (TreePropagate)."""
        lv, p = self.n.levels[l], self.p
        if isinstance(self.n, TreePropagate):
            r = lv.b.shape[2]
            down = x[self.offsets[l] + e * r: self.offsets[l] + (e + 1) * r]
        else:
            down = p[lv.a.name][e] @ x
            down = down + p[lv.a_bias.name][e] if lv.a_bias is not None else down
        u = p[lv.b.name][e] @ down
        u = u + p[lv.b_bias.name][e] if lv.b_bias is not None else u
        return lv.scale * u

    def node(self, t: int, x: Tensor, l: int, ctx: int) -> Tensor:
        """Hidden of the node at level l+1 whose children come from pool l, context ctx."""
        n, p = self.n, self.p
        lv = n.levels[l]
        sel, w = self.route.indices[l][t, ctx], self.route.weights[l][t, ctx]
        f = sel.shape[0]
        h = torch.zeros(lv.b.shape[1], dtype=F64)
        for pos in range(f):
            u = self.residual(x, l, int(sel[pos]))
            if l == 0:
                h = h + w[pos] * (_act(n.activation, u) if n.position == "all" else u)
                continue
            child = self.node(t, x, l - 1, ctx * f + pos)
            wb = p[lv.w_bias.name] if lv.w_bias is not None else 0.0
            if n.position == "all":
                h = h + w[pos] * _act(n.activation, u + p[lv.w.name] @ child + wb)
            elif n.position == "child":
                h = h + w[pos] * u + p[lv.w.name] @ _act(n.activation, child) + wb
            else:
                h = h + w[pos] * (u + p[lv.w.name] @ _act(n.activation, child) + wb)
        return h


def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return torch.zeros((), dtype=F64)
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def tree_aux(n: AuxLoss, route: TreeRouting) -> Tensor:
    """Sum over pools. ``switch_lb``: ``γ s Σ_i F_i P_i``, ``F_i`` the selections of expert i
    over (token, context, slot) divided by ``T·C_l``, ``P_i`` the mean probability.
    ``cv2_importance_load``: ``γ (CV²(importance) + CV²(load))``, importance the summed
    weights, load the number of (token, context) with a positive weight, or in training
    with noise (f < s) the smooth load ``Σ Φ((clean_i − θ)/std_i)``, θ the (f+1)-th noisy
    logit for a selected expert and the f-th otherwise. Dense pools carry none."""
    total = torch.zeros((), dtype=F64)
    if route.gate == "dense":
        return total
    for idx, w, probs, smooth in zip(route.indices, route.weights, route.probs, route.smooth_load):
        T, C, f = idx.shape
        s = probs.shape[-1]
        if n.kind == "switch_lb":
            counts = torch.bincount(idx.reshape(-1), minlength=s).to(F64)
            total = total + n.weight * s * torch.sum(counts / (T * C) * probs.reshape(-1, s).mean(0))
        else:
            dense = torch.zeros(T * C, s, dtype=F64).scatter(1, idx.reshape(T * C, f), w.reshape(T * C, f))
            load = smooth.sum(1) if smooth is not None else (dense > 0).to(F64).sum(0)
            total = total + n.weight * (_cv2(dense.sum(0)) + _cv2(load))
    return total
