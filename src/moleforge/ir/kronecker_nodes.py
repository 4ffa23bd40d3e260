"""EPT's node kinds (METHODS.md §15, §20.13): Kronecker-product experts over a shared meta-seed,
the task embedding added to the router input, the per-task output factor, and the contrastive
loss of the task embeddings. Task ids reach a site as its samples' types (``samples[1]``, ``(T,)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kinds import NodeKind, operand
from .params import ParamRef
from .types import ScalarType, TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["KroneckerMix", "TaskEmbed", "TaskScale", "TaskContrastive"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KroneckerMix(NodeKind):
    """``y = Σ_i g_i · scale · x ΔW_iᵀ`` with ``ΔW_i = ((B_i A_i) ⊗ K_i)[:d_out, :d_in]`` ``(d_out, d_in)``:
    ``B_i = b[:h_i]`` of ``b (H, R)``, ``A_i = a[:, :w_i]`` of ``a (R, W)``, ``K_i`` ``(s_i, s_i)``,
    ``h_i = ⌈d_out/s_i⌉``, ``w_i = ⌈d_in/s_i⌉``: a width that ``s_i`` does not divide cuts the product.
    Per token, with ``x`` zero-padded to ``w_i·s_i`` and ``X (w_i, s_i)``, ``X[j, l] = x[j·s_i + l]``:
    ``x ΔW_iᵀ = vec(B_i (A_i (X K_iᵀ)))[:d_out]`` (row-major), ``(T, d_in) -> (T, d_out)``."""

    id: str
    src: str = operand()
    routing: str = operand()
    a: ParamRef
    b: ParamRef
    kernels: tuple[ParamRef, ...]
    d_out: int
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.d_out)

    def sizes(self) -> tuple[int, ...]:
        """Each expert's kernel size ``s_i``."""
        return tuple(k.shape[0] for k in self.kernels)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEmbed(NodeKind):
    """``y_t = src_t + table[task_t]``: each token plus its task's embedding, ``table (tasks, width)``;
    ``y = src`` without task ids."""

    id: str
    src: str = operand()
    table: ParamRef
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.src)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskScale(NodeKind):
    """``y_t = factors[task_t] · src_t``: EPT's frequency compensation ``d_t / T``; ``y = src``
    without task ids."""

    id: str
    src: str = operand()
    factors: tuple[float, ...]
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.src)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskContrastive(NodeKind):
    """``weight · mean_t -log softmax_j(cos(src_t, table_j) / τ)[task_t]`` over the tokens
    (``cos(u, v) = u·v / (max(|u|, ε) max(|v|, ε))``, ε = 1e-12); 0 without task ids. Scalar."""

    id: str
    src: str = operand()
    table: ParamRef
    weight: float
    temperature: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return ScalarType()
