"""Top-down routing of a residual tree with the switch or dense gate as one autograd
function with a hand-written backward.

Pool ``l`` routes ``C_l`` contexts per token. A context's query reads the token's router
input and the keys its ancestors chose, ``z = [x_down, K_{L-1}[e_{L-1}], ...]``; the first
query layer is applied blockwise, ``W1 z = W1[:, :m] x_down + Σ_j (K_j W1[:, slot_j]ᵀ)[e_j]``
(one GEMM on the tokens for every pool, plus a gather from an ``(s_j, g)`` table per
ancestor), and the scores fold the second layer into the keys, ``K (W2 q + b2) = (K W2) q +
K b2``. The gate is a softmax over the pool's experts; switch keeps the top ``f``
(renormalised, or raw at fanout 1 with the official conventions), dense keeps all.

Each pool's weights depend on its own scores only (the ancestors' choices are discrete), so
the backward runs pool by pool: through the renormalisation, the softmax, the folded keys,
the query activation and the gathers, back to ``x_down`` and the router parameters. The
semantics are those of ``ops_tree._route`` (and ``ir/interpret_tree.py``); the noisy gate
uses that function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cpu import tree_decode
from .ops_tree_prop import act_, act_grad
from .packed import PackCache, caching, packed
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["route_switch_dense"]


class _Route(torch.autograd.Function):
    """Inputs: ``xd (T, m)``, ``meta`` ``(fanouts, gate, official, query_activation,
    temperature)``, then per pool ``keys (s, g)``, ``w1 (g, in_l)``, ``b1 (g,)``, ``w2 (g, g)``,
    ``b2 (g,)``. Outputs, per pool: indices ``(T, C, f)``, then weights ``(T, C, f)``, then
    probabilities ``(T, C, s)``."""

    @staticmethod
    def forward(ctx, xd: Tensor, meta: tuple, *params: Tensor):  # type: ignore[override]
        out, saved, w_tok = _route(xd, meta, params, _tables(meta[0], xd.shape[1], params))
        ctx.meta, ctx.T, ctx.m, ctx.widths, ctx.w_tok = meta, xd.shape[0], xd.shape[1], _widths(params), w_tok
        ctx.pools = saved
        ctx.save_for_backward(xd, *params)
        ctx.mark_non_differentiable(*out[:len(meta[0])])
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        fanouts, gate, official, qact, temperature = ctx.meta
        T, m, widths = ctx.T, ctx.m, ctx.widths
        xd, *params = ctx.saved_tensors
        L = len(fanouts)
        keys, w1s, w2s, b2s = params[0::5], params[1::5], params[3::5], params[4::5]
        g_w_all, g_p_all = grads[L:2 * L], grads[2 * L:]
        g_params: list[Tensor | None] = [None] * len(params)
        g_keys = [torch.zeros_like(k) for k in keys]
        g_w1 = [torch.zeros_like(w) for w in w1s]
        g_tok: list[Tensor] = []
        for l in range(L):
            h, probs, index, weights, top_sum, kw2, ancestors, C = ctx.pools[l]
            s, N = probs.shape
            g = widths[l]
            g_p, g_w = g_p_all[l], g_w_all[l]
            g_probs = g_p.reshape(N, s).T.contiguous() if g_p is not None else probs.new_zeros(s, N)
            if g_w is not None:
                g_sel = g_w.reshape(N, index.shape[0]).T  # (f, N)
                if gate == "dense":
                    g_probs += g_sel
                else:
                    if top_sum is not None:  # weights = top / Σ top
                        g_sel = (g_sel - (g_sel * weights).sum(0, keepdim=True)) / top_sum
                    g_probs.scatter_add_(0, index, g_sel)
            g_logits = probs * (g_probs - (probs * g_probs).sum(0, keepdim=True))  # (s, N)
            if temperature != 1.0:
                g_logits = g_logits / temperature
            g_kw2 = g_logits @ h  # (s, g)
            g_kb2 = g_logits.sum(1)  # (s,)
            g_pre = act_grad(qact, g_logits.T @ kw2, h)  # (N, g)
            g_keys[l] += g_kw2 @ w2s[l].T + torch.outer(g_kb2, b2s[l])
            g_params[5 * l + 3] = keys[l].T @ g_kw2
            g_params[5 * l + 4] = keys[l].T @ g_kb2
            g_tok.append(g_pre.view(T, C, g).sum(1) if C > 1 else g_pre)
            off = m
            for j, e in ancestors:
                gj = widths[j]
                g_table = g_pre.new_zeros(keys[j].shape[0], g).index_add_(0, e.reshape(-1), g_pre)  # (s_j, g)
                g_keys[j] += g_table @ w1s[l][:, off:off + gj]
                g_w1[l][:, off:off + gj] = g_table.T @ keys[j]
                off += gj
        g_tok_all = torch.cat(g_tok, 1)  # (T, Σ g_l)
        g_xd = g_tok_all @ ctx.w_tok if ctx.needs_input_grad[0] else None
        g_w_tok = g_tok_all.T @ xd  # (Σ g_l, m)
        g_b_tok = g_tok_all.sum(0)
        for l, (a, b) in enumerate(_spans(widths)):
            g_w1[l][:, :m] = g_w_tok[a:b]
            g_params[5 * l] = g_keys[l]
            g_params[5 * l + 1] = g_w1[l]
            g_params[5 * l + 2] = g_b_tok[a:b]
        return (g_xd, None, *g_params)


def _widths(params) -> list[int]:
    return [k.shape[1] for k in params[0::5]]  # key widths: the ancestor slots of the query input


def _tables(fanouts: tuple, m: int, params) -> tuple:
    """What routing computes from the weights alone: the token part of every pool's first query
    layer ``(cat W1[:, :m], cat b1)``, each pool's tables ``K_j W1[:, slot_j]ᵀ`` per ancestor
    ``j``, and the folded keys ``K W2`` and ``K b2``."""
    keys, w1s, b1s, w2s, b2s = params[0::5], params[1::5], params[2::5], params[3::5], params[4::5]
    widths = _widths(params)
    L = len(fanouts)
    w_tok = torch.cat([w[:, :m] for w in w1s])
    ancestors: list[list[Tensor]] = []
    for l in range(L):
        off, tables = m, []
        for j in range(L - 1, l, -1):  # the ancestors of pool l, from the top, as the query reads them
            tables.append(keys[j] @ w1s[l][:, off:off + widths[j]].T)  # (s_j, g_l)
            off += widths[j]
        ancestors.append(tables)
    kw2 = [k @ w2 for k, w2 in zip(keys, w2s)]  # (s, g) each
    kb2 = [(k @ b2).unsqueeze(1) for k, b2 in zip(keys, b2s)]  # (s, 1) each
    return w_tok, torch.cat(b1s), ancestors, kw2, kb2


def _route(xd: Tensor, meta: tuple, params, tables: tuple) -> tuple[tuple, list, Tensor]:
    """The forward of :class:`_Route` from the weight ``tables`` (:func:`_tables`): its outputs,
    what the backward reads per pool, and the token part of the first query layers."""
    fanouts, gate, official, qact, temperature = meta
    L, T = len(fanouts), xd.shape[0]
    w_tok, b_tok, anc_tables, kw2s, kb2s = tables
    widths = _widths(params)
    token_parts = F.linear(xd, w_tok, b_tok).split(widths, dim=1)  # (T, g_l) each
    ancestors: list[tuple[int, Tensor]] = []  # (pool j, its expert per current context (T, C))
    idx_out, w_out, p_out = [None] * L, [None] * L, [None] * L
    saved: list = [None] * L
    for l in reversed(range(L)):
        s, g = params[5 * l].shape
        pre = token_parts[l].unsqueeze(1)  # (T, 1, g)
        for table, (_, e) in zip(anc_tables[l], ancestors):
            pre = pre + F.embedding(e, table)  # (T, C, g)
        C = pre.shape[1]
        h = act_(qact, pre.reshape(T * C, g))  # in place: pre is read by nothing else
        logits = torch.addmm(kb2s[l], kw2s[l], h.T)  # (s, N)
        if temperature != 1.0:
            logits = logits / temperature
        probs = torch.softmax(logits, dim=0)
        if gate == "dense":
            index = torch.arange(s, device=xd.device).unsqueeze(1).expand(s, T * C)
            weights, top_sum = probs, None
        else:
            top, index = probs.topk(fanouts[l], dim=0)
            raw = official and fanouts[l] == 1
            top_sum = None if raw else top.sum(0, keepdim=True)
            weights = top if raw else top / top_sum
        f = index.shape[0]
        idx_out[l] = index.T.reshape(T, C, f)
        w_out[l] = weights.T.reshape(T, C, f)
        p_out[l] = probs.T.reshape(T, C, s)
        saved[l] = (h, probs, index, weights, top_sum, kw2s[l], [(j, e) for j, e in ancestors], C)
        if l > 0:
            ancestors = [(j, e.repeat_interleave(f, dim=1)) for j, e in ancestors]
            ancestors.append((l, idx_out[l].reshape(T, C * f)))
    return (*idx_out, *w_out, *p_out), saved, w_tok

def _spans(widths: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for w in widths:
        out.append((a, a + w))
        a += w
    return out


def route_switch_dense(xd: Tensor, levels: list, fanouts: list[int], gate: str, conventions: str,
                       query_activation: str, temperature: float,
                       cache: PackCache | None = None, policy: KernelPolicy = TORCH_OPS) -> tuple[tuple, tuple, tuple]:
    """``(indices, weights, probs)`` per pool (see the module doc); ``levels`` per pool
    ``(keys, w1, b1, w2, b2, _)``. Without autograd the forward runs alone, its weight tables
    kept by ``cache`` between calls (the decode path, ``packed.py``), in the compiled CPU kernel
    where ``policy`` chooses it for these tokens (``backends/cpu/tree_decode.py``)."""
    params = [t for lv in levels for t in lv[:5]]
    meta = (tuple(fanouts), gate, conventions == "official", query_activation, float(temperature))
    if caching():
        tables = packed(cache, "tree_route", params, lambda: _tables(meta[0], xd.shape[1], params))  # type: ignore[arg-type]
        if policy.decode_kernel(xd.device, xd.dtype, xd.shape[0]) == "cpu":
            out = tree_decode.route(xd, tables, *meta)  # type: ignore[arg-type]
        else:
            out = _route(xd, meta, params, tables)[0]  # type: ignore[arg-type]
    else:
        out = _Route.apply(xd, meta, *params)
    L = len(levels)
    return tuple(out[:L]), tuple(out[L:2 * L]), tuple(out[2 * L:])
