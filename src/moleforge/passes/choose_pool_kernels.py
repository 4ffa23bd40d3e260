"""``choose_pool_kernels``: per pool, the dense block-gated form or the grouped form, whichever
the cost model says is cheaper for a training step (forward and backward).

Both rewrites are exact identities (``stack_pools``, ``share_down_projections``,
``group_pools``); this pass only chooses among them, node by node:

- a shared down-projection (A with E = 1): computed once, ``share_down_projections``;
- a dense router: the stacked block-gated form, ``stack_pools``;
- a top-k router: stacked or grouped, by the estimates below.
- experts of their own ranks (``RaggedMix``) under a top-k router: its grouped form when the
  estimates below, at the experts' mean rank, prefer it (the dense form is exact too: its gates
  are zero outside the selected experts).

Cost model (multiply-add equivalents of a forward + backward over ``T`` tokens; the backward of
a trainable low-rank GEMM costs twice its forward):

    dense   = 3·T·E·r·(d_in + d_out)                              + FIXED_DENSE
    grouped = 3·T·k·r·(d_in + d_out) + MOVE·T·k·(d_in + d_out)    + FIXED_GROUPED + PER_EXPERT·E

``MOVE`` prices the gathers and scatters of the grouped form (token rows in, results out, and
their gradients) and the small-GEMM inefficiency, per moved value; the fixed terms price kernel
launches and the sort. The constants were measured on a 2-core AVX2 CPU (fp32, MKL): with torch ops the dense
form wins for E·r = 64 at k = 2 (MoLoRA's E = 8, r = 8), the grouped form from about
E·r = 256 at k = 2, or when few tokens per expert make ``T·E·r`` large against ``T·k``. So the
choice depends on E·r against k·r and the moved widths, on the active fraction k/E, and on
the token count through the fixed terms.

Where the grouped form will run the compiled CPU kernel (``kernel="cpu"``: the planner sets it
when the kernel policy plans it for the model's device and dtype,
``KernelPolicy.plans_cpu_pools``), nothing is gathered or scattered and the estimate is

    grouped_cpu = CPU_SPARSE · 3·T·k·r·(d_in + d_out) + FIXED_CPU

``CPU_SPARSE`` the kernel's cost per multiply-add against MKL's dense GEMMs (measured at
MoLoRA's sizes, ``benchmarks/train_step.py``): the grouped form then wins when ``k/E`` is below
about one half (MoLoRA's 2 of 8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..ir import Graph, PoolMix, RaggedMix, expr_shape
from ._rewrite import rewrite_nodes
from .group_pools import group_pool, sparse_k
from .share_down_projections import share_down, shared_down
from .stack_pools import stack_pool

__all__ = ["ChoosePoolKernels", "choose_pool_kernels", "PoolCost", "pool_cost"]

MOVE = 165.0
FIXED_DENSE = 0.5e6
FIXED_GROUPED = 4.0e6
PER_EXPERT = 0.1e6
CPU_SPARSE = 1.8
FIXED_CPU = 0.2e6

Kernel = Literal["torch", "cpu"]


@dataclass(frozen=True)
class PoolCost:
    """Estimated cost of one pool's two forms (multiply-add equivalents per training step)."""

    dense: float
    grouped: float | None
    """``None`` when the router is dense (no grouped form)."""
    tokens: int

    @property
    def choice(self) -> str:
        return "grouped" if self.grouped is not None and self.grouped < self.dense else "dense"


def pool_cost(experts: int, rank: int, d_in: int, d_out: int, k: int | None, tokens: int,
              kernel: Kernel = "torch") -> PoolCost:
    """The two estimates for a pool of ``experts`` rank-``rank`` experts under a top-``k`` router,
    the grouped form run by ``kernel``."""
    width = d_in + d_out
    dense = 3.0 * tokens * experts * rank * width + FIXED_DENSE
    if k is None:
        return PoolCost(dense, None, tokens)
    if kernel == "cpu":
        return PoolCost(dense, CPU_SPARSE * 3.0 * tokens * k * rank * width + FIXED_CPU, tokens)
    grouped = 3.0 * tokens * k * rank * width + MOVE * tokens * k * width + FIXED_GROUPED + PER_EXPERT * experts
    return PoolCost(dense, grouped, tokens)


def cost_of(n: PoolMix, graph: Graph, tokens: int, kernel: Kernel = "torch") -> PoolCost:
    _, r, d_in = expr_shape(n.a)
    d_out = expr_shape(n.b)[1]
    t = graph.routing(n.routing)
    k = sparse_k(graph, n.routing)
    if t.variable:  # from k to E experts per token: price the typical count
        k = graph.node(n.routing).gate.typical_k(t.experts)
    if t.variable:  # the torch ops run a variable routing (no fixed (T, k) slots for the kernel)
        kernel = "torch"
    return pool_cost(t.experts, r, d_in, d_out, k, tokens, kernel)


def choose_ragged_form(n: RaggedMix, graph: Graph, tokens: int) -> tuple | None:
    """A pool of experts of their own ranks takes the grouped form when the cost model, at its mean
    rank, prefers it (exact either way: the dense form's gates are zero outside the selected)."""
    k = sparse_k(graph, n.routing)
    if n.grouped or k is None:
        return None
    cost = pool_cost(len(n.ranks), sum(n.ranks) / len(n.ranks), n.a.shape[1], n.b.shape[0], k, tokens)  # type: ignore[arg-type]
    return (replace(n, grouped=True),) if cost.choice == "grouped" else None


@dataclass(frozen=True)
class ChoosePoolKernels:
    """The pass, parameterised by the token count per step it optimises for and the kernel the
    grouped form will run (``"cpu"``: the compiled CPU kernel; the planner sets it)."""

    tokens: int = 2048
    kernel: Kernel = "torch"
    __name__ = "choose_pool_kernels"

    def __call__(self, graph: Graph) -> Graph:
        def rule(n, g, ids):
            if isinstance(n, RaggedMix):
                return choose_ragged_form(n, g, self.tokens)
            if not isinstance(n, PoolMix):
                return None
            if shared_down(n, g):
                return share_down(n, g, ids)
            if cost_of(n, g, self.tokens, self.kernel).choice == "grouped":
                return group_pool(n, g, ids)
            return stack_pool(n, g, ids)
        return rewrite_nodes(graph, rule)


choose_pool_kernels = ChoosePoolKernels()
