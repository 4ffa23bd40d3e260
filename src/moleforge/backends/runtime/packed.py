"""Packed weights kept between forwards that need no gradient: the decode path's weight cache.

A site's code builds some tensors from its weights alone on every forward: the fused
down-projection ``cat(router, A_1, …, A_E)``, the block columns of a stacked ``B``, a sibling
group's concatenated weights, a residual tree's key tables. In a training step that work is
small against ``T`` tokens; in a decoding step (one token per sequence) it is most of the
site's time. Without autograd (``torch.no_grad()``, ``torch.inference_mode()``) a
:class:`PackCache` keeps each such tensor and rebuilds it only when a source changed.

A source "changed" when its data address, shape or version counter did: an optimizer step,
``load_state_dict``, ``copy_``, ``.data = …`` or ``.to()`` all change one of them. The cache
holds the sources it was built from, so their storage cannot be freed and its address reused
by another tensor while an entry refers to it. With autograd enabled, or while ``torch.compile`` traces,
nothing is cached: the tensors are built as before, with their graph.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PackCache", "caching", "packed", "packed_cat", "packed_columns"]


def caching() -> bool:
    """Whether packed tensors may be kept now: no autograd and no ``torch.compile`` tracing."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _key(sources: Sequence[Tensor]) -> tuple | None:
    try:
        return tuple((t.data_ptr(), t._version, t.shape) for t in sources)
    except RuntimeError:  # an inference tensor has no version counter: build afresh
        return None


class PackCache:
    """Tensors built from weights alone, by name, each with the sources it was built from.

    Not an ``nn.Module`` and not in any state dict: a generated module reads it through
    ``get_attr`` like its kernel policy. ``hits`` and ``builds`` count lookups (tests and
    benchmarks read them).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple[Tensor, ...], Tensor | tuple]] = {}
        self.hits = 0
        self.builds = 0

    def get(self, name: str, sources: Sequence[Tensor], build: Callable[[], Tensor | tuple]) -> Tensor | tuple:
        """``build()``, kept under ``name`` while ``sources`` are unchanged and :func:`caching` holds."""
        if not caching():
            return build()
        key = _key(sources)
        entry = self._entries.get(name)
        if key is not None and entry is not None and entry[0] == key:
            self.hits += 1
            return entry[2]
        value = build()
        self.builds += 1
        if key is not None:
            self._entries[name] = (key, tuple(sources), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PackCache({len(self._entries)} tensors, {self.hits} hits, {self.builds} builds)"


def packed(cache: PackCache | None, name: str, sources: Sequence[Tensor], build: Callable[[], Tensor]) -> Tensor:
    """``build()`` through ``cache`` (``None``: always built)."""
    if cache is None:
        return build()
    return cache.get(name, sources, build)  # type: ignore[return-value]


def packed_cat(cache: PackCache | None, name: str, parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat(parts, dim)``, kept by ``cache`` between forwards without autograd."""
    return packed(cache, name, parts, lambda: torch.cat(parts, dim))


def packed_columns(cache: PackCache | None, name: str, b: Tensor) -> Tensor:
    """``(E, d, r) -> (d, E·r)`` (``ops.block_columns``, a copy), kept by ``cache`` between
    forwards without autograd."""
    def build() -> Tensor:
        E, d, r = b.shape
        return b.permute(1, 0, 2).reshape(d, E * r)
    return packed(cache, name, (b,), build)
