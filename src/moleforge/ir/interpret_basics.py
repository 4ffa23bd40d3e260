"""The interpreter's rules of :mod:`.basics_nodes` (input dropout, expert capacity, the router
z-loss, pools of experts with their own ranks), in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import basics_nodes as bn
from .values import Routing

__all__ = ["capacity_keep", "dora_norm", "dora_scale", "run_dropout", "run_capacity", "run_z_loss", "run_ragged_mix",
           "run_magnitude"]

F64 = torch.float64

# Each rule is ``(node, run) -> value`` (``run``: the interpreter's ``_Run``); ``interpret.py``
# registers them in its ``RUN`` table.


def run_dropout(n: bn.Dropout, r) -> Tensor:
    """Evaluation: the identity. Training (``noise[id] = (u,)``): ``src ⊙ [u >= p] / (1 - p)``."""
    if n.id not in r.noise:
        return r.env[n.src]
    u = r.noise[n.id][0].to(F64)
    return r.env[n.src] * (u >= n.p).to(F64) / (1.0 - n.p)


def capacity_keep(index: Tensor, experts: int, factor: float) -> Tensor:
    """``(T, k)`` bool: which slots of ``index (T, k)`` fit their expert's capacity
    ``ceil(factor · T · k / E)``, slot by slot, then token by token."""
    T, k = index.shape
    cap = math.ceil(factor * T * k / experts)
    used = [0] * experts
    keep = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(index[t, j])
            if used[e] < cap:
                keep[t, j], used[e] = True, used[e] + 1
    return keep


def run_capacity(n: bn.CapacityLimit, r) -> Routing:
    route = r.env[n.routing]
    keep = capacity_keep(route.index, route.gates.shape[1], n.factor)
    gates = route.gates.clone()
    for t, j in (~keep).nonzero().tolist():
        gates[t, route.index[t, j]] = 0.0
    r.res.routes[n.id], r.res.margins[n.id] = route.index, math.inf
    return Routing(gates, route.probs, route.index, ~keep)


def run_z_loss(n: bn.ZLoss, r) -> Tensor:
    z = r.env[n.src]  # (T, E)
    return n.weight * (torch.logsumexp(z, dim=1) ** 2).mean()


def run_ragged_mix(n: bn.RaggedMix, r) -> Tensor:
    x, g = r.env[n.src], r.env[n.routing].gates  # (T, d_in), (T, E)
    A, B, o = r.p[n.a.name], r.p[n.b.name], n.offsets()
    out = torch.zeros(x.shape[0], B.shape[0], dtype=F64)
    for i, s in enumerate(n.scales):
        a, b = A[o[i]:o[i + 1]], B[:, o[i]:o[i + 1]]  # (r_i, d_in), (d_out, r_i)
        out = out + g[:, i:i + 1] * s * ((x @ a.T) @ b.T)
    return out


def dora_norm(W: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``‖W + s·B A‖`` per output row, ``(d_out,)``, without gradient (PEFT's DoRA)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(W + scale * (B @ A), dim=1)


def dora_scale(W: Tensor, a: Tensor, b: Tensor, scale: float, m: Tensor) -> Tensor:
    """DoRA's ``(‖W‖ + m) / ‖W + s·b a‖`` per output row ``(d_out,)``, ``m`` the magnitude's offset
    from the frozen row norms, the denominator without gradient."""
    return (torch.linalg.vector_norm(W, dim=1) + m) / dora_norm(W, a, b, scale)


def run_magnitude(n: bn.Magnitude, r) -> Tensor:
    x, lora = r.env[n.src], r.env[n.lora]  # (T, d_in), (T, d_out)
    W, A, B = r.p[n.weight.name], r.p[n.a.name], r.p[n.b.name]
    c = dora_scale(W, A, B, n.scale, r.p[n.magnitude.name])  # (d_out,)
    return (c - 1.0) * (x @ W.T) + c * lora
