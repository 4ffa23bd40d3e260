"""Runtime ops that generated GraphModules call: routers, gated mixes, aux losses.

Vectorised; shapes are commented per line. They must agree with the reference
interpreter (``moleforge.ir.interpret``) up to the tolerance table and top-k tie order.

Padding: the aux losses and the balancing routers' selection counts take an optional token
mask ``mask (T,)`` (``True`` = a real token, ``False`` = padding). With it they count the real
tokens only and equal their value on the real tokens alone; routing and gates are computed for
every token either way. ``mask=None`` is the unmasked computation, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir.values import Routing
from ..cpu.pool_sparse import sparse_pool
from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted, dense_mix
from .ops_linear import add_into
from .packed import PackCache
from .policy import TORCH_OPS, KernelPolicy

__all__ = [
    "block_rows", "block_columns", "jitter", "route_softmax_topk", "route_dense", "route_sigmoid_topk",
    "route_abs_topk", "route_static", "pool_mix_loop", "grouped_mix", "block_gate", "outer_gate", "gate_bias",
    "tree_path_gates", "sibling_linear", "switch_lb", "cv2_importance_load", "localized_balance", "add_aux",
    "in_backward",
]


def in_backward() -> bool:
    """True while autograd runs a backward pass, where activation checkpointing recomputes
    forwards. A compiled graph replays its side effects once per forward, so tracing never
    counts as one."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def block_rows(a: Tensor) -> Tensor:
    """``(E, r, d) -> (E·r, d)`` (a view)."""
    E, r, d = a.shape
    return a.reshape(E * r, d)


def block_columns(b: Tensor) -> Tensor:
    """``(E, d, r) -> (d, E·r)``."""
    E, d, r = b.shape
    return b.permute(1, 0, 2).reshape(d, E * r)


def jitter(x: Tensor, eps: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Training: ``x · U(1-ε, 1+ε)`` elementwise, ``x · (1 - ε + 2ε·u)`` with ``u`` drawn as
    ``torch.rand_like(x, generator=generator)`` would (the site's noise ``generator``, seeded by
    ``handle.seed_noise``; ``None``: torch's global generator); evaluation: ``x``."""
    if not training or eps == 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps, generator=generator)


def route_softmax_topk(z: Tensor, k: int, renormalize: bool, temperature: float):
    """-> (gates (T, E), probs (T, E), index (T, k))."""
    probs = torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # (T, E)
    top, index = probs.topk(k, dim=-1)  # (T, k)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, index, top)  # (T, E)
    return Routing(gates, probs, index)


def route_dense(z: Tensor, temperature: float):
    probs = torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # (T, E)
    return Routing(probs, probs, None)


def _counts(index: Tensor, E: int, dtype: torch.dtype, mask: Tensor | None = None) -> Tensor:
    """Selections per expert of ``index (T, k)``, ``(E,)``, those of real tokens only with a
    ``mask (T,)``: a fixed-shape scatter-add (``bincount``'s output shape depends on the data,
    which breaks ``torch.compile`` graphs)."""
    flat = index.reshape(-1)
    if mask is None:
        ones = torch.ones_like(flat, dtype=dtype)  # (T·k,)
    else:
        ones = mask.unsqueeze(1).expand(index.shape).reshape(-1).to(dtype)  # (T·k,) 0 on padding
    return torch.zeros(E, dtype=dtype, device=index.device).scatter_add_(0, flat, ones)


def _count(counts: Tensor, index: Tensor, training: bool, mask: Tensor | None) -> None:
    """Add this forward's selections (of real tokens, with a ``mask``) to ``counts``. A forward
    that activation checkpointing recomputes in backward selects the same experts again and is
    not counted twice; the check sits here, at the increment, because the recomputation may
    stop anywhere after it (early stop ends it at the last tensor autograd saved)."""
    if training and not in_backward():
        with torch.no_grad():
            counts += _counts(index, counts.numel(), counts.dtype, mask)


def route_sigmoid_topk(z: Tensor, balance: Tensor, counts: Tensor, k: int, training: bool,
                       mask: Tensor | None = None):
    """SMoRA: top-k of ``σ(z) + b``; gates ``k · v / Σ v`` on the kept values."""
    u = torch.sigmoid(z)  # (T, E)
    score = u + balance  # (T, E)
    top, index = score.topk(k, dim=-1)  # (T, k)
    gates = torch.zeros_like(u).scatter(1, index, k * top / top.sum(-1, keepdim=True))
    _count(counts, index, training, mask)
    return Routing(gates, u, index)


def route_abs_topk(h: Tensor, balance: Tensor, counts: Tensor, k: int, training: bool,
                   mask: Tensor | None = None):
    """FlyLoRA: binary mask of the k largest ``|h + d|``."""
    index = (h.detach() + balance).abs().topk(k, dim=-1).indices  # (T, k)
    gates = torch.zeros_like(h).scatter(1, index, 1.0)  # (T, E)
    _count(counts, index, training, mask)
    return Routing(gates, gates, index)


def route_static(x: Tensor, weights: Tensor):
    """Input-independent gates ``g_t = w``: ``x (T, ·)`` gives only T. -> (gates, probs, None)."""
    T, E = x.shape[0], weights.shape[0]
    if not torch.is_grad_enabled():  # a view of a parameter made under no_grad would still require grad
        weights = weights.detach()
    gates = weights.unsqueeze(0).expand(T, E)  # (T, E)
    a = weights.abs()  # (E,)
    probs = (a / a.sum().clamp_min(1e-12)).unsqueeze(0).expand(T, E)  # (T, E)
    return Routing(gates, probs, None)


def pool_mix_loop(x: Tensor, gates: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """Naive dense pool: one pair of small GEMMs per expert (the unoptimised form)."""
    E = gates.shape[1]
    out = x.new_zeros(x.shape[0], b.shape[1])  # (T, d_out)
    for i in range(E):
        ai, bi = a[i if a.shape[0] > 1 else 0], b[i if b.shape[0] > 1 else 0]
        out = out + gates[:, i:i + 1] * F.linear(F.linear(x, ai), bi)  # (T, d_out)
    return out * scale


def grouped_mix(x: Tensor, gates: Tensor, index: Tensor | None, a: Tensor, b: Tensor, scale: float,
                policy: KernelPolicy = TORCH_OPS, cache: PackCache | None = None, name: str = "grouped",
                acc: Tensor | None = None) -> Tensor:
    """Sparse pool: each expert runs only on the tokens that selected it. The ``P`` (token,
    expert) pairs are sorted by expert; one grouped GEMM gives every pair's ``h = A_e x``, a second
    ``B_e (s·g·h)``; a scatter-add sums each token's results. FLOPs ``P·r·(d_in + d_out)``.

    ``x (T, d_in)``, ``gates (T, E)``, ``index (T, k)`` (``P = T·k``), ``a (E|1, r, d_in)``,
    ``b (E|1, d_out, r)``; ``acc``: the frozen layer's output, which the result is added to
    (``(T, d_out)`` without it). ``index=None`` is a variable routing (DynMoLE's top-p: from k to E
    experts per token): the pairs are the non-zero gates (counting them synchronises with the
    device once). The module's kernel ``policy`` chooses (``policy.grouped_kernel``): one fused
    Triton op for the sorted pairs' products and their scatter (``backends/triton/grouped.py``),
    or on CPU float32/float64 the compiled kernel, whose forward and backward read the token rows
    in place and add into ``acc`` (``backends/cpu/pool_sparse.py``), or torch ops. At the policy's
    decode sizes (``policy.decode``) all experts run densely (``ops_decode.dense_mix``, their
    stacked factors kept by ``cache`` without autograd).
    """
    if policy.decode(x.shape[0]):
        return add_into(acc, dense_mix(x, gates, a, b, scale, cache, name))
    kernel = policy.grouped_kernel(x.device, x.dtype)
    if kernel == "cpu" and index is not None:
        y = sparse_pool(x, index, gates.gather(1, index) * scale, a, b, acc)  # (T, d_out)
        return y if acc is None else y.view(acc.shape)
    tokens, w, counts = _pairs(gates, index, scale)  # (P,), (P,), (E,)
    if kernel == "triton":
        from moleforge.backends.triton.grouped import grouped_lowrank  # imports Triton

        return add_into(acc, grouped_lowrank(x, tokens, w.to(x.dtype), counts.cumsum(0), a.to(x.dtype),
                                             b.to(x.dtype)))
    E = gates.shape[1]
    a, b = _per_expert(a, E), _per_expert(b, E)
    xs = x.index_select(0, tokens)  # (P, d_in)
    if _grouped_mm_fits(x, a, b):
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        hs = F.grouped_mm(xs, a.transpose(1, 2), offs=offs)  # (P, r)
        ys = F.grouped_mm(hs * w[:, None], b.transpose(1, 2), offs=offs)  # (P, d_out)
    else:
        ys = _expert_loop(xs, w, counts.tolist(), a, b)  # (P, d_out)
    return add_into(acc, x.new_zeros(x.shape[0], b.shape[1]).index_add(0, tokens, ys))  # (T, d_out)


def _pairs(gates: Tensor, index: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The routed (token, expert) pairs sorted by expert: each pair's token ``(P,)`` and weight
    ``scale · g`` ``(P,)``, and the pairs per expert ``(E,)``."""
    E = gates.shape[1]
    if index is None:  # a variable routing: its non-zero gates, expert-major
        active = gates.detach().T != 0  # (E, T)
        expert, tokens = active.nonzero(as_tuple=True)  # (P,) each, sorted by expert then token
        return tokens, gates[tokens, expert] * scale, active.sum(1)
    k = index.shape[1]
    flat = index.reshape(-1)  # (T*k,)
    order = torch.argsort(flat, stable=True)  # (T*k,) pairs sorted by expert
    w = gates.gather(1, index).reshape(-1)[order] * scale  # (T*k,)
    return order // k, w, _counts(flat, E, torch.long)


def _per_expert(t: Tensor, E: int) -> Tensor:
    """A factor stored once (leading dim 1) repeated for each expert."""
    return t if t.shape[0] == E else t.expand(E, *t.shape[1:]).contiguous()


def _grouped_mm_fits(x: Tensor, a: Tensor, b: Tensor) -> bool:
    """``F.grouped_mm`` runs on CPU for float32/bfloat16/float16 with 16-byte aligned rows."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per_row = 16 // x.element_size()
    return all(n % per_row == 0 for n in (a.shape[1], a.shape[2], b.shape[1]))


def _expert_loop(xs: Tensor, w: Tensor, counts: list[int], a: Tensor, b: Tensor) -> Tensor:
    """The grouped GEMMs as one pair of GEMMs per expert over its (contiguous) rows."""
    parts, start = [], 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        parts.append(F.linear(F.linear(xs[rows], a[e]) * w[rows, None], b[e]))  # (n, d_out)
        start += n
    return torch.cat(parts)


def block_gate(h: Tensor, gates: Tensor, rank: int, scale: float) -> Tensor:
    """``h ⊙ repeat(scale·g, rank)``: ``(T, E·r)``."""
    T, E = gates.shape
    return (h.view(T, E, rank) * (gates if scale == 1.0 else gates * scale).unsqueeze(-1)).view(T, E * rank)


def outer_gate(h: Tensor, gates: Tensor, scale: float) -> Tensor:
    """``scale · (g ⊗ h)``: ``(T, r), (T, E) -> (T, E·r)``."""
    T, E = gates.shape
    return (gates.unsqueeze(-1) * (h * scale).unsqueeze(1)).reshape(T, E * h.shape[1])


def gate_bias(gates: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``scale · g @ bias`` for ``bias (E, d)``; ``scale · (Σ g) · bias`` for ``bias (d,)``: ``(T, d)``."""
    out = gates @ bias if bias.dim() == 2 else gates.sum(-1, keepdim=True) * bias
    return out if scale == 1.0 else out * scale


def tree_path_gates(indices: tuple, weights: tuple, level: int, experts: int):
    """Path-aggregated gates of one pool of a tree routing, as a flat routing
    ``(gates (T, s_l), gates, None)``: per expert, the sum over its tree nodes of the product of
    the weights on the path from the root."""
    T = indices[level].shape[0]
    path = weights[-1].new_ones(T, 1)  # (T, 1): the root
    for l in reversed(range(level, len(indices))):
        path = (path.unsqueeze(-1) * weights[l]).reshape(T, -1)  # (T, F_l): every slot of pool l
    gates = path.new_zeros(T, experts).scatter_add(1, indices[level].reshape(T, -1), path)  # (T, s_l)
    return Routing(gates, gates, None)


def sibling_linear(x: Tensor, weight: Tensor, bias: Tensor | None, group, start: int, stop: int,
                   policy: KernelPolicy = TORCH_OPS) -> Tensor:
    """``x Wᵀ + b`` as columns ``[start:stop]`` of the sibling group's one GEMM of ``x``:
    ``(T, stop - start)``. The member's own ``weight``/``bias`` serve when the group cannot
    (under ``torch.compile``, or ``x`` on another device than the group's weights), and on the
    decode path without autograd (``policy.decode``), where the group's bookkeeping costs more
    than the GEMMs it merges."""
    if group is None or (policy.decode(x.shape[0]) and not torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    return group.columns(x, start, stop, weight, bias)


# ---- aux losses --------------------------------------------------------------------------

def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return v.sum() * 0.0
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def _token_sum(v: Tensor, mask: Tensor | None) -> Tensor:
    """``Σ_t v[t]`` over the tokens of ``v (T, E)``, the real ones with a ``mask (T,)``: ``(E,)``.
    ``where`` rather than a product, so that a padding token's non-finite value stays out."""
    if mask is None:
        return v.sum(0)
    return torch.where(mask.unsqueeze(1), v, 0).sum(0)


def _real_tokens(mask: Tensor) -> Tensor:
    """The number of real tokens (at least 1, so that an all-padding batch gives a zero loss)."""
    return mask.sum().clamp_min(1)


def switch_lb(gates: Tensor, probs: Tensor, index: Tensor | None, weight: float,
              mask: Tensor | None = None, training: bool = False, group=None, eval_aux: bool = True) -> Tensor:
    """``weight · E · Σ_i f_i P_i`` over the tokens (the real ones with a ``mask``); over the
    tokens of every rank of ``group`` when it reduces (``dist.py``). ``None`` in evaluation mode
    without autograd unless ``eval_aux`` (``ops_decode.aux_wanted``), as every aux loss."""
    if not aux_wanted(training, eval_aux):
        return None
    T, E = probs.shape
    if index is None:
        counts = _token_sum((gates > 0).to(probs.dtype), mask)  # (E,)
    else:
        counts = _counts(index, E, probs.dtype, mask)  # (E,)
    pg = reduce_group(group, training)
    if pg is not None:
        n = probs.new_full((1,), T) if mask is None else mask.sum().to(probs.dtype).reshape(1)
        total = all_sum(torch.cat([_token_sum(probs, mask), counts, n]), pg)  # (2E + 1,)
        p_sum, counts, n = total[:E], total[E:2 * E], total[2 * E].clamp_min(1)
        return weight * E * torch.sum(counts / n * (p_sum / n))
    if mask is None:
        return weight * E * torch.sum(counts / T * probs.mean(0))
    n = _real_tokens(mask).to(probs.dtype)
    return weight * E * torch.sum(counts / n * (_token_sum(probs, mask) / n))


def cv2_importance_load(gates: Tensor, weight: float, mask: Tensor | None = None, training: bool = False,
                        group=None, eval_aux: bool = True) -> Tensor:
    """``weight · (CV²(importance) + CV²(load))`` over the tokens (the real ones with a ``mask``);
    of every rank's tokens when ``group`` reduces."""
    if not aux_wanted(training, eval_aux):
        return None
    importance = _token_sum(gates, mask)  # (E,)
    load = _token_sum((gates > 0).to(gates.dtype), mask)  # (E,)
    pg = reduce_group(group, training)
    if pg is not None:
        importance, load = all_sum(torch.cat([importance, load]), pg).chunk(2)
    return weight * (_cv2(importance) + _cv2(load))


def localized_balance(probs: Tensor, samples: tuple[Tensor, Tensor | None] | None, weight: float,
                      delta: float, groups: int, mask: Tensor | None = None, training: bool = False,
                      group=None, eval_aux: bool = True) -> Tensor:
    """LoRAMoE's localized balance; with a ``mask``, that of the real tokens alone (their
    probabilities, sample indices and types), as if the padding had never been there. The
    samples are those that hold a token (a real one, with a ``mask``), wherever they sit in the
    batch: an all-padding row counts as no sample. When ``group`` reduces, the CV² is that of
    every rank's samples together (each rank's samples are distinct samples)."""
    if not aux_wanted(training, eval_aux):
        return None
    T, E = probs.shape
    pg = reduce_group(group, training)
    if samples is None:
        sample_idx, types = torch.zeros(T, dtype=torch.long, device=probs.device), None
    else:
        sample_idx, types = samples
    if mask is not None:  # its sample count is read from the data anyway, so selecting rows adds no sync
        probs, sample_idx = probs[mask], sample_idx[mask]
        types = None if types is None else types[mask]
        if sample_idx.numel() == 0 and pg is None:
            return probs.sum() * 0.0
    present, sample_idx = torch.unique(sample_idx, return_inverse=True)  # samples renumbered 0..M-1
    M = present.numel()
    Q = probs.new_zeros(M, E).index_add(0, sample_idx, probs)  # (M, E)
    if types is not None:
        group_of_expert = torch.arange(E, device=probs.device) * groups // E  # (E,)
        mtype = torch.zeros(M, dtype=torch.long, device=probs.device).index_put((sample_idx,), types.long())
        coef = torch.where(group_of_expert[None, :] == mtype[:, None], 1.0 + delta, 1.0 - delta).to(probs.dtype)
        Q = coef * Q
    if pg is not None:
        return weight * _cv2_over_ranks(Q.reshape(-1), pg)
    return weight * _cv2(Q.reshape(-1))


def _cv2_over_ranks(v: Tensor, group) -> Tensor:
    """:func:`_cv2` of the entries of ``v`` on every rank of ``group`` together: the mean from
    one sum, then the squared deviations from it (two passes, as ``var`` computes)."""
    head = all_sum(torch.cat([v.sum().reshape(1), v.new_full((1,), v.numel())]), group)
    n = head[1].detach()
    mean = head[0] / n.clamp_min(1)
    sq = all_sum((v - mean).square().sum(), group)
    if n < 2:  # the same on every rank: all take this branch
        return sq * 0.0
    return (sq / (n - 1)) / (mean ** 2 + 1e-10)


def add_aux(*terms: Tensor | None) -> Tensor | None:
    """The sum of the aux terms that were computed (``None`` when none was)."""
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total
