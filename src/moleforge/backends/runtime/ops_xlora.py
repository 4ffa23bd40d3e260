"""Ops of X-LoRA sites: the call's scalings of the site (its module attribute ``xlora_scalings``,
set by the model's X-LoRA controller before the adapted pass) and the gate on them."""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import InputError
from ...ir.values import Routing

__all__ = ["site_scalings", "route_xlora"]


def site_scalings(held: Tensor | None, src: Tensor, experts: int, what: str) -> Tensor:
    """The site's scalings ``(T, E)`` in the site's dtype, checked against its ``T`` tokens."""
    if held is None:
        raise InputError(f"{what} reads X-LoRA scalings and none were set for this forward: call the model the "
                         "handle was compiled into (its X-LoRA classifier runs first), or set site.xlora_scalings")
    if held.shape != (src.shape[0], experts):
        raise InputError(f"{what}: X-LoRA scalings have shape {tuple(held.shape)}, the site reads "
                         f"{src.shape[0]} tokens of {experts} experts")
    return held.to(src.dtype)


def route_xlora(s: Tensor, top_k: int | None, softmax_topk: bool, weight: float) -> Routing:
    """PEFT's ``get_maybe_topk_scalings`` times the global weight, vectorised: the top ``top_k``
    per token (ties to the lower index), a softmax over the non-zero kept ones."""
    g = s
    if top_k is not None and top_k < s.shape[1]:
        idx = torch.sort(s.detach(), dim=1, descending=True, stable=True).indices[:, :top_k]
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
        g = s * mask.to(s.dtype)
    if softmax_topk:
        nz = g != 0
        g = torch.softmax(g.masked_fill(~nz, torch.finfo(g.dtype).min), 1).masked_fill(~nz, 0.0)
    return Routing(g * weight if weight != 1.0 else g, s, None)
