"""How big an adapter is before anything is allocated, and the limits ``compile`` enforces.

A spec's sizes are free numbers (experts, ranks, levels), and an S'MoRE tree's widths grow
with ``experts × rank`` per level, so a typo can ask for trillions of parameters. ``compile``
(in :func:`~moleforge.compiler.plan`) counts the tensors each site declares (its plain graph's
``ParamDecl``) first and refuses,
with an :class:`~moleforge.errors.InjectionError` stating the numbers, when

- one site's adapter holds more than ``max(4 × the base model's parameters, 2**28)`` numbers
  (``MOLEFORGE_MAX_SITE_PARAMS=N`` sets another limit per site), or
- all sites together need more memory than the device holding the model has in all (the
  machine's RAM for a CPU model, the GPU's memory for a CUDA one), or
- an S'MoRE tree routes more than ``2**12`` nodes per token (``Σ_l Π_{j≥l} f_j``, the fanouts
  multiplied from the top: a tree of 24 levels of fanout 2 holds few parameters but routes 33
  million nodes per token, which no forward holds in memory; ``MOLEFORGE_MAX_TREE_NODES=N`` sets
  another limit).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..errors import InjectionError
from ..ir import Graph, TreeRoute

__all__ = ["MAX_SITE_PARAMS_ENV", "MAX_TREE_NODES_ENV", "SITE_FLOOR", "TREE_NODES", "site_numbers", "tree_nodes",
           "SizeCheck"]

MAX_SITE_PARAMS_ENV = "MOLEFORGE_MAX_SITE_PARAMS"
SITE_FLOOR = 2**28
"""The per-site limit never falls below this (about 1 GiB in float32), so that small models
still take adapters of any sensible size."""

MAX_TREE_NODES_ENV = "MOLEFORGE_MAX_TREE_NODES"
TREE_NODES = 2**12
"""Tree nodes a token may route through (the presets: 6; three levels of fanout 8: 584)."""

_GIB = 2**30


def site_numbers(graph: Graph) -> int:
    """Numbers a site stores: every declared tensor, trainable or buffer (not the frozen inputs
    bound to the model's own weights)."""
    return sum(math.prod(d.shape) for d in graph.params if d.init != "frozen")


def tree_nodes(graph: Graph) -> int:
    """The most routed tree nodes per token of any residual tree of the site: ``Σ_l Π_{j≥l} f_j``
    over its levels (leaves first, so the top level's ``f`` multiplies every level's count)."""
    most = 0
    for n in graph.nodes:
        if isinstance(n, TreeRoute):
            count, contexts = 0, 1
            for lv in reversed(n.levels):
                contexts *= lv.fanout
                count += contexts
            most = max(most, count)
    return most


def _env_limit(name: str, default: int, what: str) -> tuple[int, str]:
    text = os.environ.get(name, "").strip()
    if not text:
        return default, ""
    try:
        return int(float(text)), f"{name}={text}"
    except (ValueError, OverflowError):
        raise InjectionError(f"{name}={text!r} is not a number of {what}; set it to an integer such as 1e9, "
                             "or unset it") from None


def _site_limit(model: nn.Module) -> tuple[int, str]:
    """The per-site limit and where it comes from."""
    n_model = sum(p.numel() for p in model.parameters())
    limit, why = _env_limit(MAX_SITE_PARAMS_ENV, max(4 * n_model, SITE_FLOOR), "parameters")
    return limit, why or f"4 × the model's {n_model:,} parameters, at least 2**28; {MAX_SITE_PARAMS_ENV}=N sets another"


def _device_memory(model: nn.Module) -> tuple[int | None, str]:
    """Total memory of the device holding the model's parameters (``None``: unknown)."""
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory, f"GPU {dev}"
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
        except (ValueError, OSError, AttributeError):
            return None, "this machine's RAM"
    return None, str(dev)


def _largest(graph: Graph, n: int = 3) -> str:
    decls = sorted((d for d in graph.params if d.init != "frozen"), key=lambda d: -math.prod(d.shape))[:n]
    return ", ".join(f"{d.name} {tuple(d.shape)}" for d in decls)


class SizeCheck:
    """Refuses an adapter too large for ``model`` before any of it is allocated (see the module
    docstring for the rule), from the sites' plain graphs, before the passes run on them (a pass
    over a pool of a million experts takes its time too)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32
        self.limit, self.why = _site_limit(model)
        self.tree_limit, why = _env_limit(MAX_TREE_NODES_ENV, TREE_NODES, "tree nodes")
        self.tree_why = why or f"{MAX_TREE_NODES_ENV}=N sets another"

    def site(self, name: str, site_index: int, graph: Graph) -> None:
        """Raise :class:`InjectionError` when the site ``name`` holds more numbers than the limit, or
        its tree routes more nodes per token than the tree limit."""
        nodes = tree_nodes(graph)
        if nodes > self.tree_limit:
            raise InjectionError(
                f"sites[{site_index}] at module {name!r} routes {nodes:,} tree nodes per token (the fanouts "
                f"multiplied from the top level down, summed over the levels), more than the limit of "
                f"{self.tree_limit:,} ({self.tree_why}); every node is computed for every token. Reduce the "
                f"levels or fanouts of sites[{site_index}]")
        n = site_numbers(graph)
        if n > self.limit:
            raise InjectionError(
                f"sites[{site_index}] at module {name!r} would store {n:,} adapter parameters ({self._gib(n)} GiB "
                f"in {self.dtype}), more than the limit of {self.limit:,} per site ({self.why}); its largest "
                f"tensors: {_largest(graph)}. Reduce the experts, ranks or levels of sites[{site_index}]")

    def total(self, graphs: dict[str, Graph], site_of: dict[str, int]) -> None:
        """Raise :class:`InjectionError` when all sites together need more memory than the device has."""
        counts = {name: site_numbers(g) for name, g in graphs.items()}
        memory, device = _device_memory(self.model)
        if not counts or memory is None or sum(counts.values()) * self._size() <= memory:
            return
        name = max(counts, key=counts.__getitem__)
        raise InjectionError(
            f"the adapter would store {sum(counts.values()):,} parameters over {len(counts)} sites "
            f"({self._gib(sum(counts.values()))} GiB in {self.dtype}), more than the {memory / _GIB:,.1f} GiB of "
            f"{device}; the largest site is sites[{site_of[name]}] at {name!r} with {counts[name]:,} "
            f"({_largest(graphs[name])}). Reduce the spec's experts, ranks, levels or targets")

    def _size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _gib(self, n: int) -> str:
        return f"{n * self._size() / _GIB:,.1f}"
