"""The interpreter's dropout of FFN-block expert LoRAs (``block_nodes``, its module docstring), in
float64: each slot's ``ν`` turned into a keep-and-scale factor per expert and token."""

from __future__ import annotations

import torch
from torch import Tensor

from .block_nodes import ExpertLoRA

__all__ = ["lora_roles", "slot_keep", "block_keeps"]

F64 = torch.float64


def lora_roles(n, roles: tuple[str, ...]) -> list[str]:
    """The linears of block node ``n`` among ``roles`` that carry LoRAs, in the order ``roles``
    gives (the order their ``ν`` are drawn in); an ``ExpertLoRA`` is the down LoRA."""
    if isinstance(n, ExpertLoRA):
        return ["down"]
    return [role for role in roles if (lin := getattr(n, role, None)) is not None and lin.a is not None]


def slot_keep(nu: Tensor, index: Tensor | None, experts: int, p: float) -> Tensor:
    """``(E, T, width)``: ``[ν_tj >= p] / (1 - p)`` at expert ``index[t, j]`` (expert j without an
    index), 1 where token t is not routed to the expert (its gate is 0 there)."""
    T, k, width = nu.shape
    keep = (nu.to(F64) >= p).to(F64) / (1.0 - p)  # (T, k, width)
    if index is None:
        return keep.permute(1, 0, 2)  # (E, T, width): slot j is expert j
    out = torch.ones(experts, T, width, dtype=F64)
    for t in range(T):
        for j in range(k):
            out[int(index[t, j]), t] = keep[t, j]
    return out


def block_keeps(n, r, roles: tuple[str, ...]) -> dict[str, Tensor]:
    """``{role: (E, T, width)}`` for the LoRAs of block node ``n`` among ``roles`` in training
    (``r.noise[n.id]`` holds their ``ν (T, k, width)``, in the order of ``roles``); ``{}`` in
    evaluation or without dropout."""
    if n.dropout == 0 or n.id not in r.noise:
        return {}
    route = r.env[n.routing]
    names = lora_roles(n, roles)
    nus = r.noise[n.id]
    if len(nus) != len(names):
        raise ValueError(f"noise of %{n.id}: {len(nus)} draws for the LoRAs of {names}; give one ν (T, k, width) "
                         "per LoRA, in the order gate, up, down")
    return {role: slot_keep(nu, route.index, route.gates.shape[1], n.dropout) for role, nu in zip(names, nus)}
