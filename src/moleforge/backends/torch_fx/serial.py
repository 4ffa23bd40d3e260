"""Run a block of small tensor ops on one intra-op thread, forward and backward.

A residual tree's routing and propagation are dozens of small kernels on ``(T, C, d)``
tensors. With several intra-op threads, each kernel above PyTorch's grain size opens a
parallel region whose threads must all be scheduled before it ends: on a busy machine
every region can wait a scheduler time slice, so small kernels cost far more than their
work. ``serial_call(fn, *args)`` runs ``fn`` with one thread and records its autograd
graph privately; the backward pass replays that graph, again on one thread. Values and
gradients are exactly those of ``fn`` (the same kernels run); only the thread count
differs. Large GEMMs outside the block keep every thread.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

__all__ = ["serial_call", "one_thread"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Intra-op parallelism off for the block (restored after)."""
    if torch.compiler.is_compiling():
        yield
        return
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _flatten(tree: Any, out: list) -> Any:
    """Tensors of a nested tuple/list structure into ``out``; returns the structure with
    each tensor replaced by its position."""
    if isinstance(tree, Tensor):
        out.append(tree)
        return _Leaf(len(out) - 1)
    if isinstance(tree, (tuple, list)):
        parts = [_flatten(t, out) for t in tree]
        attrs = {k: _flatten(v, out) for k, v in getattr(tree, "__dict__", {}).items()}
        return _Node(type(tree), parts, attrs)
    return tree


def _unflatten(spec: Any, flat: list) -> Any:
    if isinstance(spec, _Leaf):
        return flat[spec.i]
    if isinstance(spec, _Node):
        parts = [_unflatten(p, flat) for p in spec.parts]
        if spec.kind in (tuple, list):
            return spec.kind(parts)
        obj = spec.kind(parts)
        obj.__dict__.update({k: _unflatten(v, flat) for k, v in spec.attrs.items()})
        return obj
    return spec


class _Leaf:
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


class _Node:
    __slots__ = ("kind", "parts", "attrs")

    def __init__(self, kind: type, parts: list, attrs: dict | None):
        self.kind, self.parts, self.attrs = kind, parts, attrs


class _Serial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, spec: Any, box: list, *flat: Tensor):  # type: ignore[override]
        with torch.enable_grad(), one_thread():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in flat]
            out = fn(*_unflatten(spec, leaves))
        outs: list[Tensor] = []
        box.append(_flatten(out, outs))
        ctx.leaves, ctx.outs = leaves, outs
        result = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*[r for r, o in zip(result, outs) if not o.requires_grad])
        return result

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        wanted = [t for t in ctx.leaves if t.requires_grad]
        got: dict[int, Tensor | None] = {}
        if pairs and wanted:
            with one_thread():
                gs = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True, retain_graph=True)
            got = {id(t): g for t, g in zip(wanted, gs)}
        return (None, None, None, *[got.get(id(t)) for t in ctx.leaves])


def serial_call(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` on one intra-op thread, its backward too. ``args`` and the result may
    nest tensors in tuples and lists (tuple subclasses keep their attributes)."""
    if torch.compiler.is_compiling():
        return fn(*args)  # a compiled graph schedules its own kernels; thread switches would break it
    flat: list[Tensor] = []
    spec = _flatten(args, flat)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in flat):
        with one_thread():
            return fn(*args)
    box: list = []
    result = _Serial.apply(fn, spec, box, *flat)
    return _unflatten(box[0], list(result))
