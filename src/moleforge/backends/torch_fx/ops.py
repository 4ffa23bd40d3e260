"""Runtime ops that generated GraphModules call: routers, gated mixes, aux losses.

Vectorised; shapes are commented per line. They must agree with the reference
interpreter (``moleforge.ir.interpret``) up to the tolerance table and top-k tie order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "block_rows", "block_columns", "jitter", "route_softmax_topk", "route_dense", "route_sigmoid_topk",
    "route_abs_topk", "route_static", "pool_mix_loop", "grouped_mix", "block_gate", "outer_gate", "switch_lb",
    "cv2_importance_load", "localized_balance", "add_aux",
]


def block_rows(a: Tensor) -> Tensor:
    """``(E, r, d) -> (E·r, d)`` (a view)."""
    E, r, d = a.shape
    return a.reshape(E * r, d)


def block_columns(b: Tensor) -> Tensor:
    """``(E, d, r) -> (d, E·r)``."""
    E, d, r = b.shape
    return b.permute(1, 0, 2).reshape(d, E * r)


def jitter(x: Tensor, eps: float, training: bool) -> Tensor:
    if not training or eps == 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def route_softmax_topk(z: Tensor, k: int, renormalize: bool, temperature: float):
    """-> (gates (T, E), probs (T, E), index (T, k))."""
    probs = torch.softmax(z / temperature, dim=-1)  # (T, E)
    top, index = probs.topk(k, dim=-1)  # (T, k)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, index, top)  # (T, E)
    return gates, probs, index


def route_dense(z: Tensor, temperature: float):
    probs = torch.softmax(z / temperature, dim=-1)  # (T, E)
    return probs, probs, None


def _count(counts: Tensor, index: Tensor, training: bool) -> None:
    if training:
        with torch.no_grad():
            counts += torch.bincount(index.reshape(-1), minlength=counts.numel()).to(counts.dtype)


def route_sigmoid_topk(z: Tensor, balance: Tensor, counts: Tensor, k: int, training: bool):
    """SMoRA: top-k of ``σ(z) + b``; gates ``k · v / Σ v`` on the kept values."""
    u = torch.sigmoid(z)  # (T, E)
    score = u + balance  # (T, E)
    top, index = score.topk(k, dim=-1)  # (T, k)
    gates = torch.zeros_like(u).scatter(1, index, k * top / top.sum(-1, keepdim=True))
    _count(counts, index, training)
    return gates, u, index


def route_abs_topk(h: Tensor, balance: Tensor, counts: Tensor, k: int, training: bool):
    """FlyLoRA: binary mask of the k largest ``|h + d|``."""
    index = (h.detach() + balance).abs().topk(k, dim=-1).indices  # (T, k)
    gates = torch.zeros_like(h).scatter(1, index, 1.0)  # (T, E)
    _count(counts, index, training)
    return gates, gates, index


def route_static(x: Tensor, weights: Tensor):
    """Input-independent gates ``g_t = w``: ``x (T, ·)`` gives only T. -> (gates, probs, None)."""
    T, E = x.shape[0], weights.shape[0]
    gates = weights.unsqueeze(0).expand(T, E)  # (T, E)
    a = weights.abs()  # (E,)
    probs = (a / a.sum().clamp_min(1e-12)).unsqueeze(0).expand(T, E)  # (T, E)
    return gates, probs, None


def pool_mix_loop(x: Tensor, gates: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """Naive dense pool: one pair of small GEMMs per expert (the unoptimised form)."""
    E = gates.shape[1]
    out = x.new_zeros(x.shape[0], b.shape[1])  # (T, d_out)
    for i in range(E):
        ai, bi = a[i if a.shape[0] > 1 else 0], b[i if b.shape[0] > 1 else 0]
        out = out + gates[:, i:i + 1] * F.linear(F.linear(x, ai), bi)  # (T, d_out)
    return out * scale


def grouped_mix(x: Tensor, gates: Tensor, index: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """Sparse pool: each expert runs only on the tokens that selected it (gather, two small
    GEMMs, weighted scatter-add): FLOPs ``T·k·r·(d_in + d_out)``."""
    T, k = index.shape
    E = gates.shape[1]
    flat = index.reshape(-1)  # (T*k,)
    order = torch.argsort(flat, stable=True)  # (T*k,)
    tokens = order // k  # (T*k,) token of each sorted slot
    counts = torch.bincount(flat, minlength=E).tolist()
    w = gates.gather(1, index).reshape(-1)[order]  # (T*k,)
    out = x.new_zeros(T, b.shape[1])  # (T, d_out)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens[start:start + n]
        ae, be = a[e if a.shape[0] > 1 else 0], b[e if b.shape[0] > 1 else 0]
        ye = F.linear(F.linear(x.index_select(0, tok), ae), be)  # (n, d_out)
        out = out.index_add(0, tok, ye * w[start:start + n, None])
        start += n
    return out * scale


def block_gate(h: Tensor, gates: Tensor, rank: int, scale: float) -> Tensor:
    """``h ⊙ repeat(scale·g, rank)``: ``(T, E·r)``."""
    T, E = gates.shape
    return (h.view(T, E, rank) * (gates * scale).unsqueeze(-1)).view(T, E * rank)


def outer_gate(h: Tensor, gates: Tensor, scale: float) -> Tensor:
    """``scale · (g ⊗ h)``: ``(T, r), (T, E) -> (T, E·r)``."""
    T, E = gates.shape
    return (gates.unsqueeze(-1) * (h * scale).unsqueeze(1)).reshape(T, E * h.shape[1])


# ---- aux losses --------------------------------------------------------------------------

def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return v.sum() * 0.0
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def switch_lb(gates: Tensor, probs: Tensor, index: Tensor | None, weight: float) -> Tensor:
    T, E = probs.shape
    if index is None:
        counts = (gates > 0).to(probs.dtype).sum(0)  # (E,)
    else:
        counts = torch.bincount(index.reshape(-1), minlength=E).to(probs.dtype)  # (E,)
    return weight * E * torch.sum(counts / T * probs.mean(0))


def cv2_importance_load(gates: Tensor, weight: float) -> Tensor:
    return weight * (_cv2(gates.sum(0)) + _cv2((gates > 0).to(gates.dtype).sum(0)))


def localized_balance(probs: Tensor, samples: tuple[Tensor, Tensor | None] | None, weight: float,
                      delta: float, groups: int) -> Tensor:
    T, E = probs.shape
    if samples is None:
        sample_idx, types = torch.zeros(T, dtype=torch.long, device=probs.device), None
    else:
        sample_idx, types = samples
    M = int(sample_idx.max()) + 1
    Q = probs.new_zeros(M, E).index_add(0, sample_idx, probs)  # (M, E)
    if types is None:
        return weight * _cv2(Q.reshape(-1))
    group = torch.arange(E, device=probs.device) * groups // E  # (E,)
    mtype = torch.zeros(M, dtype=torch.long, device=probs.device).index_put((sample_idx,), types.long())
    coef = torch.where(group[None, :] == mtype[:, None], 1.0 + delta, 1.0 - delta).to(probs.dtype)
    return weight * _cv2((coef * Q).reshape(-1))


def add_aux(*terms: Tensor) -> Tensor:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
