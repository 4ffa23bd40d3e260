"""Sibling groups at run time: sites that read the same tensor (q/k/v; gate/up) compute their
input GEMMs as one, ``x · cat(W_1, …, W_n)ᵀ``, and each reads its columns.

The IR carries the group as :class:`~moleforge.ir.SiblingLinear` nodes; this object is where
the members meet at run time. The first member called with a tensor ``x`` computes the fused
GEMM; the others called with that same tensor take their slices of it. "The same tensor" is
the same view of the same base object (each adapted module reshapes its input, so members
see distinct view objects of one hidden state), unchanged since (version counter), under the
same grad mode and with the same weights (their version counters). Any other call computes afresh,
so the result is always exactly the member's own linear. Without autograd the concatenated
weights are kept between calls (``packed.py``) until a member's weight changes. The fused output is released once
every member has read it. Under ``torch.compile``, or for an input on another device than the
group's weights (a replica), the member computes its own linear from its own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import LoweringError
from ...ir import BlockColumns, BlockRows, Concat, ParamExpr, ParamRef, Pick, expr_refs
from . import ops
from .packed import PackCache

__all__ = ["SiblingGroup", "param_value"]


def param_value(e: ParamExpr, module: nn.Module) -> Tensor:
    """The tensor a parameter expression denotes, read from ``module``'s attributes (what the
    generated code computes for the same expression)."""
    match e:
        case ParamRef(name=n):
            return getattr(module, n)
        case BlockRows(src=s):
            return ops.block_rows(param_value(s, module))
        case BlockColumns(src=s):
            return ops.block_columns(param_value(s, module))
        case Pick(src=s, index=i):
            return param_value(s, module)[i]
        case Concat(parts=ps, dim=d):
            return torch.cat([param_value(p, module) for p in ps], d)
    raise LoweringError(f"no value for parameter expression {e!r}")


class SiblingGroup:
    """One fused GEMM shared by sibling site modules.

    Not an ``nn.Module``: the members own the parameters; the group only reads them.
    """

    def __init__(self, name: str):
        self.name = name
        self._members: list[tuple[nn.Module, ParamExpr, ParamExpr | None, int, int]] = []
        self._refs: list[tuple[nn.Module, str]] = []
        """Every member tensor the fused weights read, as ``(module, attribute)``."""
        self._key: tuple | None = None
        self._base: Tensor | None = None
        self._parts: dict[int, Tensor] = {}
        self._unread: set[int] = set()
        self._packed = PackCache()
        """The fused weights, kept between forwards without autograd (``packed.py``)."""
        self.gemms = 0
        """Fused GEMMs computed so far (one per input shared by the members)."""

    def join(self, module: nn.Module, weight: ParamExpr, bias: ParamExpr | None, start: int, stop: int) -> None:
        """Add a member whose linear is columns ``[start:stop]`` of the group's GEMM."""
        self._members.append((module, weight, bias, start, stop))
        self._members.sort(key=lambda m: m[3])
        self._refs = [(module, r.name) for module, w, b, _, _ in self._members
                      for e in (w, b) if e is not None for r in expr_refs(e)]

    @property
    def width(self) -> int:
        return self._members[-1][4] if self._members else 0

    def columns(self, x: Tensor, start: int, stop: int, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The member's linear of ``x`` (its own ``weight``, ``bias``): ``(T, stop - start)``."""
        if torch.compiler.is_compiling() or x.device != self._device():
            return F.linear(x, weight, bias)
        base = x if x._base is None else x._base
        key = (x.storage_offset(), tuple(x.shape), x.stride(), x._version, torch.is_grad_enabled(),
               self._weight_versions())
        if self._base is not base or self._key != key or start not in self._unread:
            self._fuse(x, base, key)
        out = self._parts[start]
        self._unread.discard(start)
        if not self._unread:
            self._base, self._key, self._parts = None, None, {}
        return out

    def _fused_weights(self) -> tuple[Tensor, Tensor | None]:
        """``(cat(W_1, …, W_n), cat(b_1, …, b_n) or None)``, a missing bias as zeros."""
        weights, biases = [], []
        for module, w, b, _, _ in self._members:
            weights.append(param_value(w, module))
            biases.append(param_value(b, module) if b is not None else None)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        return torch.cat(weights), bias

    def _sources(self) -> list[Tensor]:
        return [getattr(module, name) for module, name in self._refs]

    def _fuse(self, x: Tensor, base: Tensor, key: tuple) -> None:
        weight, bias = self._packed.get("weights", self._sources(), self._fused_weights)
        out = F.linear(x, weight, bias)  # (T, width)
        self.gemms += 1
        sizes = [m[4] - m[3] for m in self._members]
        # one split: its backward is one concatenation of the members' gradients
        self._parts = dict(zip((m[3] for m in self._members), torch.split(out, sizes, dim=1)))
        self._base, self._key = base, key
        self._unread = {m[3] for m in self._members}

    def _device(self) -> torch.device:
        module, w, _, _, _ = self._members[0]
        return getattr(module, expr_refs(w)[0].name).device

    def _weight_versions(self) -> int:
        return sum(getattr(module, name)._version for module, name in self._refs)

    def __repr__(self) -> str:
        return f"SiblingGroup({self.name!r}, {len(self._members)} members, {self.width} columns)"
