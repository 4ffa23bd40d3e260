"""Reduce an adapter site to one low-rank update, when its ``Δy`` does not depend on the input
except linearly: ``Δy(x) = s · (x Aᵀ) Bᵀ`` with ``A (R, d_in)``, ``B (d_out, R)``.

That holds when every router the output reads is static (``StaticGate``: the same gates for
every token) and every node is linear in its tensor input: plain LoRA, static-gated pools
(CAT, X-LoRA with fixed scalings), their shared experts, and the block/outer-gated forms the
passes rewrite pools into (METHODS.md §20.1, §20.3, §20.5). The result feeds both exports: a
merged weight ``W + s·B·A`` and a PEFT LoRA of rank R.

The reduction walks the graph once, carrying for each tensor node a factored linear map
``v(x) = s · x aᵀ bᵀ`` (``a = None``: the identity on ``x``; ``b = None``: no right factor):

- ``Linear(W, scale c)``: ``b ← W b`` (``b = None``: ``b ← W``), ``s ← c s``;
- ``PoolMix`` with static gates ``g``: ``a ← [A_1 M; …; A_E M]``, ``b ← [g_1 B_1, …, g_E B_E]``
  with ``M`` the source's map (a shared A or B collapses to rank r: ``Σ g_i B_i`` / ``Σ g_i A_i``);
- ``BlockGate``: ``b ← diag(repeat(c g, r)) b``; ``OuterGate``: ``b ← [c g_1 b; …; c g_E b]``;
- ``Add``: factors side by side; ``Columns``: rows of ``b``; ``Jitter``: identity (evaluation).

Whenever the right factor has fewer rows than the rank, it is folded into ``a`` (the rank never
exceeds the widths it passes through). Plain LoRA keeps its own tensors: ``a = A``, ``b = B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import networkx as nx
import torch
from torch import Tensor

from ..errors import NotMergeableError
from ..ir import Graph, Rules, eval_expr, format_node, nodes

__all__ = ["LowRank", "NotReducibleError", "reduce_site", "REDUCE", "REDUCE_GATE"]

F64 = torch.float64


@dataclass(frozen=True)
class LowRank:
    """``Δy(x) = scale · (x aᵀ) bᵀ``: ``a (R, d_in)``, ``b (d_out, R)``."""

    scale: float
    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_weight(self) -> Tensor:
        """``ΔW = scale · b a`` as ``[d_out, d_in]``, in float64."""
        return self.scale * (self.b.to(F64) @ self.a.to(F64))


class NotReducibleError(NotMergeableError):
    """A site's ``Δy`` is not a fixed low-rank map. ``node`` names the IR node (a router that reads
    the input, or a kind with no low-rank rule), ``origin`` its spec path, ``input_dependent``
    whether the cause is routing on the input."""

    def __init__(self, message: str, *, node: str, origin: str, input_dependent: bool):
        super().__init__(message)
        self.node, self.origin, self.input_dependent = node, origin, input_dependent


@dataclass(frozen=True)
class _Map:
    """``v(x) = s · x aᵀ bᵀ``; ``a = None`` is the identity (then ``b`` is None too)."""

    s: float
    a: Tensor | None
    b: Tensor | None


@dataclass(frozen=True)
class _Gates:
    g: Tensor  # (E,)


def reduce_site(graph: Graph, params: Mapping[str, Tensor]) -> LowRank:
    """The site's ``Δy`` as one low-rank update.

    Args:
        graph: the site's IR graph.
        params: its tensors by declared name.
    Raises:
        NotReducibleError: the output reads a router that depends on the input (naming it), or a
            node kind without a low-rank rule.
    """
    needed = nx.ancestors(graph.dag(), graph.output) | {graph.output}
    for n in graph.nodes:  # name the router first: it is the reason, whatever feeds it
        if isinstance(n, nodes.RouterNode) and not n.input_independent and n.id in needed:
            raise _routed(graph, n)
    env: dict[str, object] = {}
    for n in graph.nodes:
        if n.id in needed:
            env[n.id] = REDUCE[n](graph, n, env, params)
    m = env[graph.output]
    assert isinstance(m, _Map)
    a = m.a if m.a is not None else torch.eye(graph.d_in, dtype=F64)
    b = m.b if m.b is not None else torch.eye(a.shape[0], dtype=a.dtype)
    return LowRank(scale=m.s, a=a, b=b)


def _refuse(graph: Graph, n, why: str, input_dependent: bool) -> NotReducibleError:
    line = format_node(n, graph.type(n.id))
    where = f"{n.origin} " if n.origin else ""
    return NotReducibleError(f"{where}`{line}` {why}", node=n.id, origin=n.origin, input_dependent=input_dependent)


def _routed(graph: Graph, n) -> NotReducibleError:
    return _refuse(graph, n, "routes each token on its input, so the update depends on the input", True)


Rule = Callable[[Graph, Any, dict, Mapping[str, Tensor]], object]

REDUCE: Rules[Rule] = Rules("the low-rank reduction", nodes.NODE_KINDS)
"""Node kind -> ``(graph, node, env, params) -> value``: a :class:`_Map` for a tensor, gates for a
static routing; kinds that are not linear in the input refuse (:func:`_not_reducible`)."""

REDUCE_GATE: Rules[Rule] = Rules("the low-rank reduction's gates", nodes.GATE_KINDS)
"""Gate kind -> the rule of a :class:`~moleforge.ir.nodes.Route` with that gate."""


def _not_reducible(graph: Graph, n, env: dict, params: Mapping[str, Tensor]):
    raise _refuse(graph, n, f"{type(n).__name__} has no low-rank rule", False)


REDUCE.add(_not_reducible, nodes.SiblingLinear, nodes.TreeMix, nodes.TreePropagate, nodes.TreePathGates,
           nodes.GateBias, nodes.AuxLoss, nodes.ExpertFFN, nodes.ExpertHidden, nodes.ExpertSum, nodes.ExpertLoRA,
           nodes.CoreExperts, nodes.CoreMerge, nodes.TaskScores, nodes.LayerScalings)
REDUCE.add(lambda graph, n, env, params: _Map(1.0, None, None), nodes.Input)
REDUCE.add(lambda graph, n, env, params: env[n.src], nodes.Jitter)  # evaluation: the identity
REDUCE.add(lambda graph, n, env, params: _columns(env[n.src], n.start, n.stop, graph.d_in), nodes.Columns)
REDUCE.add(lambda graph, n, env, params: _add([env[s] for s in n.srcs], graph.d_in), nodes.Add)
REDUCE.add(lambda graph, n, env, params: REDUCE_GATE[n.gate](graph, n, env, params), nodes.Route)


@REDUCE.register(nodes.TreeRoute)
@REDUCE_GATE.register(nodes.SoftmaxTopK, nodes.DenseSoftmax, nodes.SigmoidTopK, nodes.AbsTopK, nodes.TopPTsallis,
                      nodes.SelfActivated, nodes.DenseTrainTopK, nodes.XLoRAScale)
def _input_dependent(graph: Graph, n, env: dict, params: Mapping[str, Tensor]):
    raise _routed(graph, n)


@REDUCE_GATE.register(nodes.StaticGate)
def _static(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Gates:
    return _Gates(eval_expr(n.gate.weights, params))


@REDUCE.register(nodes.Linear)
def _linear_node(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Map:
    if n.bias is not None:
        raise _refuse(graph, n, "adds a bias: an affine map, not a low-rank update", False)
    return _linear(env[n.src], eval_expr(n.weight, params), n.scale)


@REDUCE.register(nodes.PoolMix, nodes.GroupedMix)
def _pool_node(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Map:
    return _pool(env[n.src], env[n.routing].g, eval_expr(n.a, params), eval_expr(n.b, params), n.scale)


@REDUCE.register(nodes.BlockGate)
def _block_gate(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Map:
    d = torch.repeat_interleave(env[n.routing].g.to(F64) * n.scale, n.rank)  # (E·r,)
    return _scale_rows(env[n.src], d)


REDUCE.add(lambda graph, n, env, params: _outer(env[n.src], env[n.routing].g, n.scale, graph.d_in), nodes.OuterGate)


def _compact(m: _Map) -> _Map:
    """Fold ``b`` into ``a`` when it has fewer rows than the rank (``v = s x (b a)ᵀ``)."""
    if m.a is not None and m.b is not None and m.b.shape[0] < m.b.shape[1]:
        return _Map(m.s, m.b.to(F64) @ m.a.to(F64), None)
    return m


def _linear(m: _Map, w: Tensor, scale: float) -> _Map:
    s = m.s * scale
    if m.a is None:
        return _Map(s, w, None)
    if m.b is None:
        return _compact(_Map(s, m.a, w))
    return _compact(_Map(s, m.a, w.to(F64) @ m.b.to(F64)))


def _columns(m: _Map, start: int, stop: int, d_in: int) -> _Map:
    if m.a is None:
        return _Map(m.s, torch.eye(d_in, dtype=F64)[start:stop], None)
    if m.b is None:
        return _Map(m.s, m.a[start:stop], None)
    return _compact(_Map(m.s, m.a, m.b[start:stop]))


def _dense(m: _Map, d_in: int) -> tuple[Tensor, Tensor]:
    a = m.a if m.a is not None else torch.eye(d_in, dtype=F64)
    b = m.b if m.b is not None else torch.eye(a.shape[0], dtype=F64)
    return a.to(F64), b.to(F64)


def _add(terms: list[_Map], d_in: int) -> _Map:
    s = terms[0].s
    parts = [_dense(t, d_in) for t in terms]
    a = torch.cat([p[0] for p in parts], 0)  # (ΣR, d_in)
    b = torch.cat([p[1] * (t.s / s) for p, t in zip(parts, terms)], 1)  # (d_out, ΣR)
    return _compact(_Map(s, a, b))


def _through(m: _Map, a_i: Tensor) -> Tensor:
    """``A_i`` applied after the source map: ``(r, d_in)`` (the source's scale stays outside)."""
    if m.a is None:
        return a_i
    inner = a_i.to(F64) if m.b is None else a_i.to(F64) @ m.b.to(F64)  # (r, R)
    return inner @ m.a.to(F64)  # (r, d_in)


def _pool(m: _Map, g: Tensor, A: Tensor, B: Tensor, scale: float) -> _Map:
    """``Σ_i g_i · scale · (v A_iᵀ) B_iᵀ`` with ``A (E_a, r, ·)``, ``B (E_b, d_out, r)``."""
    E = g.shape[0]
    s = m.s * scale
    g64 = g.to(F64)
    if A.shape[0] == 1:  # shared down-projection: Σ g_i B_i
        b = sum(g64[i] * B[min(i, B.shape[0] - 1)].to(F64) for i in range(E))
        return _compact(_Map(s, _through(m, A[0]), b))
    if B.shape[0] == 1:  # shared up-projection: Σ g_i A_i
        a = sum(g64[i] * _through(m, A[i]).to(F64) for i in range(E))
        return _compact(_Map(s, a, B[0]))
    a = torch.cat([_through(m, A[i]) for i in range(E)], 0)  # (E·r, d_in)
    b = torch.cat([g64[i] * B[i].to(F64) for i in range(E)], 1)  # (d_out, E·r)
    return _compact(_Map(s, a, b))


def _scale_rows(m: _Map, d: Tensor) -> _Map:
    """``v ⊙ d`` on the output columns: ``diag(d)`` applied after ``b`` (or ``a``)."""
    if m.a is None:
        return _Map(m.s, torch.diag(d), None)
    if m.b is None:
        return _Map(m.s, d[:, None] * m.a.to(F64), None)
    return _Map(m.s, m.a, d[:, None] * m.b.to(F64))


def _outer(m: _Map, g: Tensor, scale: float, d_in: int) -> _Map:
    """``scale · [g_1 v, …, g_E v]``: ``(T, w) -> (T, E·w)``."""
    a, b = _dense(m, d_in)
    b = torch.cat([scale * g.to(F64)[i] * b for i in range(g.shape[0])], 0)  # (E·w, R)
    return _compact(_Map(m.s, a, b))


# ---- input dropout, capacity, z-loss, ragged pools (basics_nodes) -------------------------

REDUCE.add(lambda graph, n, env, params: env[n.src], nodes.Dropout)  # evaluation: the identity
REDUCE.add(_not_reducible, nodes.ZLoss)
REDUCE.add(_input_dependent, nodes.CapacityLimit)


@REDUCE.register(nodes.RaggedMix)
def _ragged_node(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Map:
    """``b ← b diag(repeat(g_i s_i, r_i))``, ``a ← A`` after the source map."""
    m, g = env[n.src], env[n.routing].g.to(F64)
    d = torch.repeat_interleave(g * torch.tensor(n.scales, dtype=F64), torch.tensor(n.ranks))  # (Σ r_i,)
    return _compact(_Map(m.s, _through(m, eval_expr(n.a, params)), eval_expr(n.b, params).to(F64) * d[None, :]))
REDUCE.add(_not_reducible, nodes.Magnitude)  # DoRA rescales the frozen rows: not a low-rank update


# ---- EPT (kronecker_nodes) -------------------------------------------------------------------

REDUCE.add(_not_reducible, nodes.TaskContrastive)
REDUCE.add(_not_reducible, nodes.PoolMagnitude)  # DoRA rescales the frozen rows: not a low-rank update


@REDUCE.register(nodes.TaskEmbed, nodes.TaskScale)
def _by_task(graph: Graph, n, env: dict, params: Mapping[str, Tensor]):
    raise _refuse(graph, n, "reads each sample's task id, so the update is not one fixed map", True)


@REDUCE.register(nodes.KroneckerMix)
def _kronecker_node(graph: Graph, n, env: dict, params: Mapping[str, Tensor]) -> _Map:
    """``(B_i A_i) ⊗ K_i = (B_i ⊗ K_i)(A_i ⊗ I_s)``, cut to ``(d_out, d_in)`` by cutting the rows of
    the first factor and the columns of the second: expert i is a LoRA of rank ``R·s_i`` with
    ``a_i = (A_i ⊗ I)[:, :d_in]``, ``b_i = g_i · scale · (B_i ⊗ K_i)[:d_out]``; the experts side by side."""
    m, g = env[n.src], env[n.routing].g.to(F64)
    A, B, d_in = params[n.a.name].to(F64), params[n.b.name].to(F64), graph.width(n.src)
    a_parts, b_parts = [], []
    for i, ref in enumerate(n.kernels):
        K, s = params[ref.name].to(F64), ref.shape[0]
        w, h = -(-d_in // s), -(-n.d_out // s)
        a_parts.append(torch.kron(A[:, :w], torch.eye(s, dtype=F64))[:, :d_in])  # (R·s, d_in)
        b_parts.append(g[i] * n.scale * torch.kron(B[:h], K)[:n.d_out])  # (d_out, R·s)
    return _compact(_Map(m.s, _through(m, torch.cat(a_parts, 0)), torch.cat(b_parts, 1)))
REDUCE.add(_not_reducible, nodes.Preserve)  # an aux loss: not on the output's path
