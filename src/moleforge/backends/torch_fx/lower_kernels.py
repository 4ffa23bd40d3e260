"""Whether a generated module may run the compiled CPU kernels, and their build, at lowering (never
in a forward): routed FFN blocks, residual trees, grouped pools and pools' decode forms."""

from __future__ import annotations

import torch
from torch import nn

from ...ir import Graph, nodes
from ..runtime.ops_decode import PoolDecode
from ..runtime.policy import CPU_KERNEL_DTYPES, KernelPolicy
from .lower_block import runs_as_routed_ffn

__all__ = ["with_cpu_build"]


def with_cpu_build(graph: Graph, store: nn.Module, policy: KernelPolicy,
                   device: torch.device | str | None, decode_form: PoolDecode | None) -> KernelPolicy:
    """``policy`` with the CPU kernel built when it may choose it here: routed FFN blocks, a
    residual tree, a grouped pool or a pool's decode form, a module for a CPU (``device``, else
    the store's) with float32/float64 tensors."""
    kinds = (nodes.TreeRoute, nodes.TreePropagate, nodes.TreeMix, nodes.GroupedMix)
    uses = decode_form is not None or any(runs_as_routed_ffn(graph, n) or isinstance(n, kinds) for n in graph.nodes)
    if not policy.wants_cpu_build() or not uses:
        return policy
    t = next(iter(list(store.parameters()) + list(store.buffers())), None)
    where = torch.device(device) if device is not None else (t.device if t is not None else torch.device("cpu"))
    if where.type != "cpu" or (t is not None and t.dtype not in CPU_KERNEL_DTYPES):
        return policy
    return policy.with_cpu_build()
