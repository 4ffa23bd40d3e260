"""A routed LoRA pool whose router feeds nothing else: the router's GEMM, its softmax top-k gate and
the grouped pool as one op (``routed_grouped_mix``), emitted by lowering (``torch_fx/lower_routed.py``)
in place of the three nodes

    %logits = linear %x W=router_w        (no bias, unscaled, read by the route alone)
    %route  = route %logits softmax_topk(k, renormalize, temperature)
    %mix    = grouped_mix %x by %route A B scale

Where the kernel policy chooses the compiled CPU kernel for the grouped pool
(``KernelPolicy.grouped_kernel``), one call of it (``backends/cpu/pool_sparse.routed_pool``) scores,
gates and mixes every token, and its backward returns the gradients of x (the experts' and the
router's parts summed in one pass), of the router and of each expert's factors: none of the
small per-site ops of the gate runs, and the router's thin GEMMs become passes over rows already
in cache. Elsewhere (another device or dtype, the decode sizes, the torch ops) the same three ops
run one after the other. The routing (gates, probabilities, index) is returned either way, for
the aux losses and the routing log.
"""

from __future__ import annotations

from torch import Tensor

from ...ir.values import Routing
from ..cpu.pool_sparse import routed_pool
from . import ops
from .ops_linear import linear
from .packed import PackCache
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["routed_grouped_mix"]


def routed_grouped_mix(x: Tensor, router_w: Tensor, a: Tensor, b: Tensor, k: int, renormalize: bool,
                       temperature: float, scale: float, policy: KernelPolicy = TORCH_OPS,
                       cache: PackCache | None = None, name: str = "grouped",
                       acc: Tensor | None = None) -> tuple[Tensor, Routing]:
    """``(y, routing)``: ``routing = route_softmax_topk(x W_rᵀ, k, renormalize, temperature)`` and
    ``y = grouped_mix(x, routing, a, b, scale)``, added to ``acc`` when given (the frozen layer's
    output; ``y`` then has its shape). ``x (T, d_in)``, ``router_w (E, d_in)``, ``a (E|1, r, d_in)``,
    ``b (E|1, d_out, r)``."""
    if not policy.decode(x.shape[0]) and policy.grouped_kernel(x.device, x.dtype) == "cpu":
        y, probs, gates, index = routed_pool(x, router_w, a, b, acc, k, renormalize, temperature, scale)
        return (y if acc is None else y.view(acc.shape)), Routing(gates, probs, index)
    route = ops.route_softmax_topk(linear(x, router_w), k, renormalize, temperature)
    return ops.grouped_mix(x, route.gates, route.index, a, b, scale, policy, cache, name, acc), route
