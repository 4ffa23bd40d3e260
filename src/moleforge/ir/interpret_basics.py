"""The interpreter's rules of :mod:`.basics_nodes` (input dropout, expert capacity, the router
z-loss, pools of experts with their own ranks), in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import basics_nodes as bn
from .interpret import F64, RUN, _Run, eval_expr
from .values import Routing

__all__ = ["capacity_keep"]


@RUN.register(bn.Dropout)
def _dropout(n: bn.Dropout, r: _Run) -> Tensor:
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


@RUN.register(bn.CapacityLimit)
def _capacity(n: bn.CapacityLimit, r: _Run) -> Routing:
    route = r.env[n.routing]
    keep = capacity_keep(route.index, route.gates.shape[1], n.factor)
    gates = route.gates.clone()
    for t, j in (~keep).nonzero().tolist():
        gates[t, route.index[t, j]] = 0.0
    r.res.routes[n.id], r.res.margins[n.id] = route.index, math.inf
    return Routing(gates, route.probs, route.index, ~keep)


@RUN.register(bn.ZLoss)
def _z_loss(n: bn.ZLoss, r: _Run) -> Tensor:
    z = r.env[n.src]  # (T, E)
    return n.weight * (torch.logsumexp(z, dim=1) ** 2).mean()


@RUN.register(bn.RaggedMix)
def _ragged_mix(n: bn.RaggedMix, r: _Run) -> Tensor:
    x, g = r.env[n.src], r.env[n.routing].gates  # (T, d_in), (T, E)
    A, B, o = eval_expr(n.a, r.p), eval_expr(n.b, r.p), n.offsets()
    out = torch.zeros(x.shape[0], B.shape[0], dtype=F64)
    for i, s in enumerate(n.scales):
        a, b = A[o[i]:o[i + 1]], B[:, o[i]:o[i + 1]]  # (r_i, d_in), (d_out, r_i)
        out = out + g[:, i:i + 1] * s * ((x @ a.T) @ b.T)
    return out
