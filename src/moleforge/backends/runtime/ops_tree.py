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

from moleforge.ir.values import TreeRouting

from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted
from .ops_tree_prop import act_, propagate_all
from .ops_tree_route import route_switch_dense
from .packed import PackCache, packed
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["TreeRouting", "tree_route", "tree_down", "tree_inputs", "tree_block", "tree_project",
           "tree_propagate", "tree_aux"]


def _act(name: str, v: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(v)
    if name == "relu":
        return torch.relu(v)
    return v


def tree_route(xd: Tensor, levels: list, fanouts: list[int], gate: str, conventions: str,
               query_activation: str, temperature: float, training: bool,
               generator: torch.Generator | None = None, cache: PackCache | None = None,
               policy: KernelPolicy = TORCH_OPS) -> TreeRouting:
    """Route all tokens top-down (see :class:`~moleforge.ir.nodes.TreeRoute`): the switch and
    dense gates as one autograd function (``ops_tree_route.py``), the noisy gate by
    :func:`_route_noisy`. ``cache``: the module's packed weights (the decode path, ``packed.py``);
    ``policy``: the module's kernel policy (the CPU kernel at decode sizes)."""
    if gate != "noisy_topk":
        idx, weights, probs = route_switch_dense(xd, levels, fanouts, gate, conventions, query_activation,
                                                 temperature, cache, policy)
        return TreeRouting(idx, weights, probs, gate)
    return _route_noisy(xd, levels, fanouts, conventions, query_activation, temperature, training, generator)


def _route_noisy(xd: Tensor, levels: list, fanouts: list[int], conventions: str, query_activation: str,
                 temperature: float, training: bool, generator: torch.Generator | None) -> TreeRouting:
    """The noisy top-k gate's routing (cosine scores, noise in training), through autograd.

    The query MLP's first layer reads ``z = [x_down, ancestor keys]``; it is applied
    blockwise, ``W1 z = W1[:, :m] x_down + Σ_j (K_j W1[:, slot_j]ᵀ)[e_j]``: one GEMM on the
    tokens for every pool at once plus a gather from an ``(s_j, g)`` table per ancestor; no
    ``(T, C, in_l)`` router input is built. The noisy gate's noise projection rides in the
    same GEMM as extra rows. Logits are kept expert-major ``(s, T·C)``: softmax and top-k over
    a short last axis are slow.

    Args:
        xd: ``(T, m)`` router input.
        levels: per pool ``(keys (s, g), w1 (g, in_l), b1, w2, b2, noise (s, in_l) or None)``.
        fanouts: ``f_l`` per pool.
        generator: draws the training noise ``ε``, pool by pool from the top, ``(T, C_l, s_l)``.
    """
    L, (T, m) = len(levels), xd.shape
    kvec = [F.normalize(lv[0], dim=-1, eps=1e-12) for lv in levels]
    w_in, b_in = [], []
    for keys, w1, b1, _, _, noise in levels:
        with_noise = training and noise is not None
        w_in.append(torch.cat([w1, noise]) if with_noise else w1)  # (g [+ s], in_l)
        b_in.append(torch.cat([b1, b1.new_zeros(keys.shape[0])]) if with_noise else b1)
    token_part = F.linear(xd, torch.cat([w[:, :m] for w in w_in]), torch.cat(b_in))  # (T, Σ g_l [+ s_l])
    token_parts = token_part.split([w.shape[0] for w in w_in], dim=1)
    ancestors: list[tuple[int, Tensor]] = []  # (pool j, its chosen expert per current context (T, C))
    out: list = [[None] * L for _ in range(4)]  # indices, weights, probs, smooth loads
    for l in reversed(range(L)):
        keys, _, _, w2, b2, _ = levels[l]
        s, g = keys.shape
        pre = token_parts[l].unsqueeze(1)  # (T, 1, g [+ s])
        off = m
        for j, e in ancestors:
            gj = kvec[j].shape[1]
            pre = pre + F.embedding(e, kvec[j] @ w_in[l][:, off:off + gj].T)  # (T, C, g [+ s])
            off += gj
        C = pre.shape[1]
        h = _act(query_activation, pre[..., :g]).reshape(T * C, g)
        q = F.normalize(F.linear(h, w2, b2), dim=-1, eps=1e-12)
        clean = kvec[l] @ q.T  # (s, T·C)
        if temperature != 1.0:
            clean = clean / temperature
        std = None
        if pre.shape[-1] > g:  # training noise
            std = (F.softplus(pre[..., g:]) + 0.01).reshape(T * C, s).T
            eps = torch.randn((T, C, s), generator=generator, device=xd.device, dtype=clean.dtype)
            logits = clean + eps.reshape(T * C, s).T * std
        else:
            logits = clean
        sel = _select_noisy(logits, clean, std, fanouts[l], conventions == "official" and fanouts[l] == 1)
        for k, v in enumerate(sel[:3]):
            out[k][l] = v.T.reshape(T, C, v.shape[0])  # (s or f, T·C) -> (T, C, s or f)
        out[3][l] = sel[3]  # (s, T·C) or None
        if l > 0:
            fl = out[0][l].shape[-1]
            ancestors = [(j, e.repeat_interleave(fl, dim=1)) for j, e in ancestors]
            ancestors.append((l, out[0][l].reshape(T, C * fl)))
    return TreeRouting(*(tuple(o) for o in out[:3]), "noisy_topk", tuple(out[3]))


def _select_noisy(logits: Tensor, clean: Tensor, std: Tensor | None, f: int, raw: bool):
    """One pool's noisy top-k gate on expert-major logits ``(s, N)``: ``(index (f, N), weights
    (f, N), probs (s, N), smooth load (s, N) or None)``; ``raw``: the official unnormalised
    fanout-1 weight."""
    s = logits.shape[0]
    probs = torch.softmax(logits, dim=0)
    smooth = std is not None and f < s
    top, index = logits.topk(f + 1 if smooth else f, dim=0)
    load = _smooth_load(clean, logits, std, top, f) if smooth else None
    top, index = top[:f], index[:f]
    return index, top if raw else torch.softmax(top, dim=0), probs, load


def _smooth_load(clean: Tensor, noisy: Tensor, std: Tensor, top: Tensor, f: int) -> Tensor:
    """Shazeer's smooth load per context ``(s, N)`` from expert-major ``(s, N)`` logits: for each
    expert the probability, over a fresh noise draw, of being selected given the others' noisy
    logits. The load of the pool is its sum over the contexts (of real tokens)."""
    thr_in, thr_out = top[f:f + 1], top[f - 1:f]  # (f+1)-th and f-th noisy logit
    p_in = torch.special.ndtr((clean - thr_in) / std)
    p_out = torch.special.ndtr((clean - thr_out) / std)
    return torch.where(noisy > thr_in, p_in, p_out)


def _rows(weights: list[Tensor], d: int) -> Tensor:
    """Row blocks stacked into one ``(Σ rows, d)`` matrix."""
    if len(weights) == 1:
        return weights[0].reshape(-1, d)
    return torch.cat([w.reshape(-1, d) for w in weights])


def _bias(weights: list[Tensor], biases: list[Tensor | None], d: int) -> Tensor | None:
    """The biases of :func:`_rows` (a missing one counts as zero; none at all: ``None``)."""
    if all(b is None for b in biases):
        return None
    parts = [b.reshape(-1) if b is not None else w.new_zeros(w.numel() // d) for w, b in zip(weights, biases)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def tree_down(x: Tensor, a_list: list[Tensor], a_bias: list[Tensor | None]) -> Tensor:
    """Every pool's and expert's down-projection in one GEMM: ``(T, Σ_l s_l r_l)``,
    pool-major, expert-major, ``A_{l,n} x + a_{l,n}``."""
    d = x.shape[-1]
    return F.linear(x, _rows(a_list, d), _bias(a_list, a_bias, d))


def tree_inputs(x: Tensor, down_w: Tensor, a_list: list[Tensor], cache: PackCache | None = None) -> Tensor:
    """``x [W_down; A_0; ...; A_{L-1}]ᵀ`` ``(T, m + Σ s_l r_l)``: the router's down-projection
    and every expert's down-projection from one GEMM, without biases (:func:`tree_block`
    adds them); the stacked rows kept by ``cache`` without autograd."""
    rows = packed(cache, "tree_inputs", [down_w, *a_list], lambda: _rows([down_w, *a_list], x.shape[-1]))
    return x @ rows.T


def tree_block(both: Tensor, m: int, down_b: Tensor | None, a_bias: list[Tensor | None], route: tuple,
               levels: list, activation: str, position: str,
               ones: bool = False, policy: KernelPolicy = TORCH_OPS,
               cache: PackCache | None = None) -> tuple[TreeRouting, Tensor]:
    """Routing and propagation from :func:`tree_inputs` ``both``: ``x_down = both[:, :m] + b``,
    ``h_all = both[:, m:] + a``; ``route`` holds the arguments of :func:`tree_route` after
    ``xd``, ``levels`` those of :func:`tree_propagate`. Returns ``(routing, root hidden
    (T, d_L))``; with ``ones`` the hidden gets a last column of ones ``(T, d_L + 1)`` for
    :func:`tree_project`. ``policy``: the module's kernel policy (:func:`tree_propagate`)."""
    xd, h_all = both[:, :m], both[:, m:]
    if down_b is not None:
        xd = xd + down_b
    if any(ab is not None for ab in a_bias):
        h_all = h_all + torch.cat([ab.reshape(-1) if ab is not None else B.new_zeros(B.shape[0] * B.shape[2])
                                   for ab, (B, *_) in zip(a_bias, levels)])
    routing = tree_route(xd, *route, cache=cache, policy=policy)
    h = tree_propagate(h_all, routing.indices, routing.weights, levels, activation, position, policy)
    return routing, torch.cat([h, h.new_ones(h.shape[0], 1)], 1) if ones else h


class _Project(torch.autograd.Function):
    """``h1 [W, b]ᵀ``: a biased linear as one GEMM each way (the bias is the weight of the
    ones column of ``h1``), with no separate bias broadcast or reduction."""

    @staticmethod
    def forward(ctx, h1: Tensor, w: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        wb = torch.cat([w, b.unsqueeze(1)], 1)  # (d_out, d + 1)
        ctx.save_for_backward(h1, wb)
        return h1 @ wb.T

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h1, wb = ctx.saved_tensors
        gh = g @ wb if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gwb = g.T @ h1  # (d_out, d + 1)
            gw, gb = gwb[:, :-1].contiguous(), gwb[:, -1].contiguous()
        return gh, gw, gb


def tree_project(h1: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``Δy = h W_projᵀ + b_proj`` from ``h1 = [h, 1] (T, d_L + 1)`` (see :class:`_Project`)."""
    return _Project.apply(h1, w, b)


def _node_inputs(h: Tensor, idx: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Per tree node ``(T, C·f)``: the pool's down-projections ``h (T, s·r)`` with every block
    but the node's expert zeroed ``(T, C·f, s·r)``, and the expert's one-hot ``(T, C·f, s)``."""
    T, C, f = idx.shape
    onehot = F.one_hot(idx.reshape(T, C * f), s).to(h.dtype)
    masked = h.view(T, 1, s, h.shape[1] // s) * onehot.unsqueeze(-1)  # (T, C·f, s, r)
    return masked.view(T, C * f, h.shape[1]), onehot


def _mix(w: Tensor, msg: Tensor) -> Tensor:
    """``Σ_p w_p msg_p``: ``w (T, C, f)``, ``msg (T, C·f, d)`` -> ``(T, C, d)``. A broadcast
    product and a sum: batched matmuls of ``f``-long rows are far slower on CPU."""
    T, C, f = w.shape
    return (w.unsqueeze(-1) * msg.view(T, C, f, msg.shape[-1])).sum(2)


def tree_propagate(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str,
                   position: str = "all", policy: KernelPolicy = TORCH_OPS) -> Tensor:
    """:func:`_propagate`; position ``all`` as one autograd function (``ops_tree_prop.py``), or
    with the Triton node kernel where the module's kernel ``policy`` chooses it."""
    if position == "all":
        return propagate_all(h_all, indices, weights, levels, activation, policy)
    return _propagate(h_all, indices, weights, levels, activation, position)


def _propagate(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str,
               position: str) -> Tensor:
    """Bottom-up propagation from all down-projections ``h_all (T, Σ s_l r_l)``; returns the
    root hidden ``(T, d_L)``.

    ``levels``: per pool ``(B (s, d_{l+1}, r), b_bias, W or None, W_bias, scale)``. Each
    level is one GEMM over its tree nodes: a node's input row is ``[h ⊙ mask_e, onehot_e,
    h_child]`` (its expert's down-projection block, the expert's one-hot, the child's
    hidden) and the weight ``[c B_nᵀ stacked; c b_n + w; Wᵀ]``, so ``u_{l,e} + W h_child + w``
    comes out of one product, without gathering per-expert results.
    """
    T = h_all.shape[0]
    off, h = 0, h_all
    for l, (B, b_bias, W, W_bias, scale) in enumerate(levels):
        s, dn, r = B.shape
        idx, w = indices[l], weights[l]  # (T, C, f)
        masked, onehot = _node_inputs(h_all[:, off:off + s * r], idx, s)
        off += s * r
        xs, ws = [masked], [B.transpose(1, 2).reshape(s * r, dn) * scale]
        node_bias = None if b_bias is None else b_bias * scale  # (s, dn)
        if l > 0 and position != "child" and W_bias is not None:
            node_bias = W_bias.expand(s, dn) if node_bias is None else node_bias + W_bias
        if node_bias is not None:
            xs.append(onehot)
            ws.append(node_bias)
        if l > 0 and position != "child":
            xs.append(h if position == "all" else _act(activation, h))  # (T, C·f, d_l)
            ws.append(W.T)
        pre = torch.cat(xs, -1) @ torch.cat(ws, 0)  # (T, C·f, dn)
        if l > 0 and position == "child":
            C, f = idx.shape[1], idx.shape[2]
            kids = _act(activation, h).view(T, C, f, h.shape[-1]).sum(2)  # (T, C, d_l)
            h = _mix(w, pre) + F.linear(kids, W, None if W_bias is None else W_bias * f)
        else:
            h = _mix(w, act_(activation, pre) if position == "all" else pre)  # (T, C, dn)
    return h.reshape(T, h.shape[1] * h.shape[2])  # one root context


def _cv2(v: Tensor) -> Tensor:
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10) if v.numel() > 1 else v.sum() * 0.0


def tree_aux(route: TreeRouting, kind: str, weight: float, mask: Tensor | None = None, training: bool = False,
             group=None, eval_aux: bool = True) -> Tensor:
    """Sum over pools of the switch load balance or the CV² importance + load loss
    (training noisy gate: the smooth load). Dense trees carry none (zero); none is computed
    in evaluation mode without autograd unless ``eval_aux`` (``None``, ``ops_decode.aux_wanted``). With a token
    ``mask (T,)`` the statistics count the real tokens' contexts only; when ``group`` reduces
    (``dist.py``), those of every rank's tokens."""
    if not aux_wanted(training, eval_aux):
        return None
    indices, weights, probs = route.indices, route.weights, route.probs
    total = probs[0].new_zeros(())
    if route.gate == "dense":
        return total
    smooth = route.smooth_load or (None,) * len(indices)
    pg = reduce_group(group, training)
    if pg is not None:
        return _tree_aux_over_ranks(route, smooth, kind, weight, mask, pg)
    for idx, w, p, load in zip(indices, weights, probs, smooth):
        if mask is not None:
            total = total + _pool_aux_masked(idx, w, p, load, kind, weight, mask)
            continue
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
            else:
                load = load.sum(1)
            total = total + weight * (_cv2(importance) + _cv2(load))
    return total


def _pool_stats(idx: Tensor, w: Tensor, p: Tensor, load: Tensor | None, kind: str,
                mask: Tensor | None) -> list[Tensor]:
    """One pool's statistics, sums over its routed contexts (those of real tokens with a
    ``mask``): ``switch_lb``: ``[Σ probs (s,), selections (s,), contexts (1,)]``; CV²:
    ``[importance (s,), load (s,)]``."""
    T, C, f = idx.shape
    s = p.shape[-1]
    flat = idx.reshape(-1)  # (T·C·f,)
    real = None if mask is None else mask.view(T, 1, 1)
    slot = None if mask is None else real.expand(T, C, f).reshape(-1)  # (T·C·f,) slot of a real token
    ones = torch.ones_like(flat, dtype=p.dtype) if slot is None else slot.to(p.dtype)
    if kind == "switch_lb":
        p_sum = (p if real is None else torch.where(real, p, 0)).reshape(-1, s).sum(0)  # (s,)
        counts = p.new_zeros(s).index_add(0, flat, ones)  # (s,)
        n = p.new_full((1,), T * C) if mask is None else (mask.sum() * C).to(p.dtype).reshape(1)
        return [p_sum, counts, n]
    importance = p.new_zeros(s).index_add(0, flat, (w if real is None else torch.where(real, w, 0)).reshape(-1))
    if load is None:
        load = p.new_zeros(s).index_add(0, flat, ones * (w.reshape(-1) > 0))  # (s,)
    else:
        load = (load if mask is None else torch.where(mask.repeat_interleave(C), load, 0)).sum(1)  # (s,)
    return [importance, load]


def _tree_aux_over_ranks(route: TreeRouting, smooth: tuple, kind: str, weight: float, mask: Tensor | None,
                         group) -> Tensor:
    """:func:`tree_aux` of every rank's tokens: each pool's statistics (:func:`_pool_stats`)
    summed over the ranks of ``group`` in one all-reduce, then each pool's loss."""
    pools = [_pool_stats(idx, w, p, load, kind, mask)
             for idx, w, p, load in zip(route.indices, route.weights, route.probs, smooth)]
    sizes = [t.numel() for stats in pools for t in stats]
    summed = iter(all_sum(torch.cat([t for stats in pools for t in stats]), group).split(sizes))
    total = route.probs[0].new_zeros(())
    for stats in pools:
        if kind == "switch_lb":
            p_sum, counts, n = (next(summed) for _ in stats)
            n = n[0].clamp_min(1)
            total = total + (weight * p_sum.numel() / n) * (counts @ (p_sum / n))
        else:
            importance, load = (next(summed) for _ in stats)
            total = total + weight * (_cv2(importance) + _cv2(load))
    return total


def _pool_aux_masked(idx: Tensor, w: Tensor, p: Tensor, load: Tensor | None, kind: str, weight: float,
                     mask: Tensor) -> Tensor:
    """One pool's term of :func:`tree_aux` over the contexts of the real tokens of ``mask (T,)``,
    with fixed shapes: padding enters every sum with weight 0."""
    T, C, f = idx.shape
    s = p.shape[-1]
    flat = idx.reshape(-1)  # (T·C·f,)
    real = mask.view(T, 1, 1)
    slot = real.expand(T, C, f).reshape(-1)  # (T·C·f,) whether a slot belongs to a real token
    if kind == "switch_lb":
        counts = p.new_zeros(s).index_add(0, flat, slot.to(p.dtype))  # (s,)
        n = (mask.sum().clamp_min(1) * C).to(p.dtype)  # routed contexts of real tokens
        mean_p = torch.where(real, p, 0).reshape(-1, s).sum(0) / n  # (s,)
        return (weight * s / n) * (counts @ mean_p)
    importance = p.new_zeros(s).index_add(0, flat, torch.where(real, w, 0).reshape(-1))  # (s,)
    if load is None:
        load = p.new_zeros(s).index_add(0, flat, ((w.reshape(-1) > 0) & slot).to(p.dtype))  # (s,)
    else:
        load = torch.where(mask.repeat_interleave(C), load, 0).sum(1)  # (s, T·C) -> (s,)
    return weight * (_cv2(importance) + _cv2(load))
