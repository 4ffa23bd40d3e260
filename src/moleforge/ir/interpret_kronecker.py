"""The interpreter's rules of EPT's nodes (:mod:`.kronecker_nodes`), in float64, written from
their definitions: each expert's ``ΔW_i = ((B_i A_i) ⊗ K_i)[:d_out, :d_in]`` is built as a matrix here (the
reference, not the runtime: the runtime never forms it)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import kronecker_nodes as kn
from .task_nodes import task_labels

__all__ = ["expert_delta", "run_kronecker_mix", "run_task_embed", "run_task_scale", "run_task_contrastive"]

F64 = torch.float64


def expert_delta(a: Tensor, b: Tensor, kernel: Tensor, d_in: int, d_out: int) -> Tensor:
    """``ΔW_i = ((b[:h] a[:, :w]) ⊗ K_i)[:d_out, :d_in]`` with ``h = ⌈d_out/s⌉``, ``w = ⌈d_in/s⌉``:
    ``(d_out, d_in)``, the product cut where ``s`` does not divide a width."""
    s = kernel.shape[0]
    h, w = -(-d_out // s), -(-d_in // s)
    z = b[:h] @ a[:, :w]  # (h, w)
    return torch.kron(z, kernel)[:d_out, :d_in]  # (h·s, w·s) cut to (d_out, d_in)


def run_kronecker_mix(n: kn.KroneckerMix, r) -> Tensor:
    x, g = r.env[n.src], r.env[n.routing].gates  # (T, d_in), (T, E)
    a, b = r.p[n.a.name], r.p[n.b.name]
    out = torch.zeros(x.shape[0], n.d_out, dtype=F64)
    for i, ref in enumerate(n.kernels):
        dw = expert_delta(a, b, r.p[ref.name], x.shape[1], n.d_out)
        out = out + g[:, i:i + 1] * n.scale * (x @ dw.T)
    return out


def _tasks(r, bound: int, n) -> Tensor | None:
    """Each token's task id, or ``None`` without task ids."""
    if r.samples is None or r.samples[1] is None:
        return None
    return task_labels(r.samples, bound, f"{n.origin or n.id}")


def run_task_embed(n: kn.TaskEmbed, r) -> Tensor:
    table = r.p[n.table.name]
    t = _tasks(r, table.shape[0], n)
    return r.env[n.src] if t is None else r.env[n.src] + table[t]


def run_task_scale(n: kn.TaskScale, r) -> Tensor:
    t = _tasks(r, len(n.factors), n)
    return r.env[n.src] if t is None else r.env[n.src] * torch.tensor(n.factors, dtype=F64)[t][:, None]


def run_task_contrastive(n: kn.TaskContrastive, r) -> Tensor:
    x, table = r.env[n.src], r.p[n.table.name]
    label = _tasks(r, table.shape[0], n)
    if label is None:  # no labels (inference): no loss
        return torch.zeros((), dtype=F64)
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(u @ v.T / n.temperature, dim=1)  # (T, tasks)
    return -n.weight * logp[torch.arange(x.shape[0]), label].mean()
