"""The reference interpreter: the semantics of the IR, in float64.

Written for clarity, not speed: routers and residual trees run token by token, pools
expert by expert. Every backend and every pass is checked against it.

Tie-break rule: top-k keeps the largest scores, ties going to the lower expert index
(a stable descending sort). ``margins`` reports, per router, the smallest gap between
the last kept and the first dropped score, so tests can avoid near-ties; or pass
``routing={node_id: indices}`` (fixed-routing mode) to impose the selection: indices
``(T, k)`` for a flat router, a tuple of ``(T, F_{l+1}, f_l)`` per pool for a tree router.
Gate values are still computed from the scores at the imposed indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from .graph import Graph
from .interpret_tree import stable_top, tree_aux, tree_mix, tree_route
from .nodes import (
    AbsTopK,
    Add,
    AuxLoss,
    BlockGate,
    Columns,
    DenseSoftmax,
    ExpertFFN,
    ExpertHidden,
    ExpertLinear,
    ExpertLoRA,
    ExpertSum,
    GateBias,
    GroupedMix,
    Input,
    Jitter,
    Linear,
    OuterGate,
    PoolMix,
    Route,
    SiblingLinear,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TreeMix,
    TreePathGates,
    TreePropagate,
    TreeRoute,
)
from .params import BlockColumns, BlockRows, Concat, ParamExpr, ParamRef, Pick

__all__ = ["interpret", "Result", "eval_expr", "block_activation"]

F64 = torch.float64


@dataclass
class Result:
    output: Tensor
    """``Δy (T, d_out)``, float64."""
    aux: dict[str, Tensor] = field(default_factory=dict)
    """Each aux-loss node's weighted value (scalar)."""
    routes: dict[str, object] = field(default_factory=dict)
    """Selected indices per router (flat: ``(T, k)``; tree: tuple per pool)."""
    margins: dict[str, float] = field(default_factory=dict)
    """Smallest top-k selection gap per router (``inf`` for dense)."""
    values: dict[str, object] = field(default_factory=dict)

    @property
    def aux_total(self) -> Tensor:
        return sum(self.aux.values(), torch.zeros((), dtype=F64))


def eval_expr(e: ParamExpr, params: Mapping[str, Tensor]) -> Tensor:
    """Value of a parameter expression."""
    match e:
        case ParamRef(name=n):
            return params[n]
        case BlockRows(src=s):
            v = eval_expr(s, params)  # (E, r, d)
            return torch.cat([v[i] for i in range(v.shape[0])], 0)  # (E*r, d)
        case BlockColumns(src=s):
            v = eval_expr(s, params)  # (E, d, r)
            return torch.cat([v[i] for i in range(v.shape[0])], 1)  # (d, E*r)
        case Pick(src=s, index=i):
            return eval_expr(s, params)[i]
        case Concat(parts=ps, dim=d):
            return torch.cat([eval_expr(p, params) for p in ps], d)
    raise TypeError(e)


def interpret(graph: Graph, params: Mapping[str, Tensor], x: Tensor, *,
              routing: Mapping[str, object] | None = None,
              samples: tuple[Tensor, Tensor | None] | None = None,
              noise: Mapping[str, tuple[Tensor, ...]] | None = None) -> Result:
    """Run ``graph`` on ``x (T, d_in)`` in float64 (autograd flows to ``params`` and ``x``).

    Args:
        params: every declared tensor by name.
        routing: fixed-routing mode, ``{router id: indices}``.
        samples: ``(sample index (T,), sample type (T,) or None)`` for localized balancing.
        noise: training mode of noisy tree gates, ``{tree router id: (ε_0, ..., ε_{L-1})}``,
            ``ε_l (T, C_l, s_l)`` standard normal (see :class:`~moleforge.ir.nodes.TreeRoute`).
    """
    p = {k: v.to(F64) for k, v in params.items()}
    res = Result(output=torch.empty(0))
    env: dict[str, object] = {}
    fixed = dict(routing or {})
    for n in graph.nodes:
        env[n.id] = _run(n, env, p, x.to(F64), fixed, res, samples, dict(noise or {}))
    res.output = env[graph.output]  # type: ignore[assignment]
    res.aux = {a: env[a] for a in graph.aux}  # type: ignore[misc]
    res.values = env
    return res


def _run(n, env, p, x, fixed, res: Result, samples, noise):  # noqa: C901 - one case per node kind
    match n:
        case Input():
            return x
        case Linear():
            out = n.scale * (env[n.src] @ eval_expr(n.weight, p).T)
            return out + eval_expr(n.bias, p) if n.bias is not None else out
        case SiblingLinear():
            out = env[n.src] @ eval_expr(n.weight, p).T
            return out + eval_expr(n.bias, p) if n.bias is not None else out
        case GateBias():
            g, bias = env[n.routing]["gates"], eval_expr(n.bias, p)
            return n.scale * (g @ bias if bias.dim() == 2 else g.sum(1, keepdim=True) * bias)
        case TreePathGates():
            return _path_gates(env[n.routing], n.level)
        case Columns():
            return env[n.src][:, n.start:n.stop]
        case Add():
            return sum(env[s] for s in n.srcs[1:]) + env[n.srcs[0]]
        case Jitter():
            return env[n.src]
        case Route():
            r = _route(n, env[n.src], p, fixed.get(n.id))
            res.routes[n.id], res.margins[n.id] = r["index"], r["margin"]
            return r
        case PoolMix() | GroupedMix():
            return _pool(env[n.src], env[n.routing]["gates"], eval_expr(n.a, p), eval_expr(n.b, p), n.scale)
        case BlockGate():
            g = env[n.routing]["gates"] * n.scale
            return env[n.src] * torch.repeat_interleave(g, n.rank, dim=1)
        case OuterGate():
            g, h = env[n.routing]["gates"], env[n.src]
            return torch.cat([g[:, i:i + 1] * h for i in range(g.shape[1])], 1) * n.scale
        case TreeRoute():
            r = tree_route(n, env[n.src], p, fixed.get(n.id), noise.get(n.id))
            res.routes[n.id], res.margins[n.id] = r["index"], r["margin"]
            return r
        case TreeMix() | TreePropagate():
            return tree_mix(n, env[n.src], env[n.routing], p)
        case AuxLoss():
            return _aux(n, env[n.routing], samples)
        case ExpertFFN():
            return _expert_ffn(n, env, p)
        case ExpertHidden():
            return _expert_hidden(n, env, p)
        case ExpertSum():
            g, h = env[n.routing]["gates"], env[n.src]  # (T, E), (E, T, d_ff)
            return sum(g[:, i:i + 1] * h[i] for i in range(g.shape[1]))
        case ExpertLoRA():
            g, h, A, B = env[n.routing]["gates"], env[n.src], p[n.a.name], p[n.b.name]
            return sum(g[:, i:i + 1] * n.scale * ((h[i] @ A[i].T) @ B[i].T) for i in range(g.shape[1]))
    raise TypeError(f"the interpreter has no rule for {type(n).__name__}")


def _route(n: Route, z: Tensor, p, fixed) -> dict:
    T, E = z.shape
    gates = torch.zeros(T, E, dtype=F64)
    g = n.gate
    if isinstance(g, DenseSoftmax):
        probs = torch.softmax(z / g.temperature, dim=1)
        return {"gates": probs, "probs": probs, "index": None, "margin": math.inf}
    if isinstance(g, StaticGate):
        w = p[g.weights.name]  # (E,); z is the site input, read only for T
        gates = w.expand(T, n.experts)  # (T, E): the same weights for every token
        probs = (w.abs() / w.abs().sum().clamp_min(1e-12)).expand(T, n.experts)  # (T, E)
        return {"gates": gates, "probs": probs, "index": None, "margin": math.inf}
    probs = torch.softmax(z / g.temperature, 1) if isinstance(g, SoftmaxTopK) else torch.sigmoid(z)
    if isinstance(g, SoftmaxTopK):
        score = probs
    elif isinstance(g, SigmoidTopK):
        score = probs + p[g.balance.name]
    else:  # AbsTopK
        score = (z + p[g.balance.name]).abs()
    rows, index, margin = [], [], math.inf
    for t in range(T):
        if fixed is not None:
            sel = torch.as_tensor(fixed[t])
        else:
            sel, m = stable_top(score[t], g.k)
            margin = min(margin, m)
        index.append(sel)
        row = gates[t].clone()
        if isinstance(g, SoftmaxTopK):
            v = score[t, sel]
            row[sel] = v / v.sum() if g.renormalize else v
        elif isinstance(g, SigmoidTopK):
            v = score[t, sel]
            row[sel] = g.k * v / v.sum()
        else:
            row[sel] = 1.0
        rows.append(row)
    gates = torch.stack(rows)
    if isinstance(g, AbsTopK):
        probs = gates
    return {"gates": gates, "probs": probs, "index": torch.stack(index), "margin": margin}


def _pool(x: Tensor, gates: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    out = torch.zeros(x.shape[0], B.shape[1], dtype=F64)
    for i in range(gates.shape[1]):
        a, b = A[i if A.shape[0] > 1 else 0], B[i if B.shape[0] > 1 else 0]
        out = out + gates[:, i:i + 1] * scale * ((x @ a.T) @ b.T)
    return out


# ---- FFN-block experts --------------------------------------------------------------------

def block_activation(name: str, v: Tensor) -> Tensor:
    """The closed set of FFN activations (``nodes.BlockActivation``), elementwise."""
    match name:
        case "silu":
            return v * torch.sigmoid(v)
        case "gelu":
            return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
        case "gelu_tanh":
            return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
        case "relu":
            return torch.relu(v)
        case "quick_gelu":
            return v * torch.sigmoid(1.702 * v)
    raise ValueError(f"unknown block activation {name!r}")


def _path_gates(route: dict, level: int) -> dict:
    """``ĝ (T, s_l)``: per expert of pool ``level``, the sum over its tree nodes of the product
    of the weights on the path from the root (the context of pool l is the slot
    ``c·f_{l+1} + p`` of pool l+1)."""
    index, weights = route["index"], route["weights"]
    T = index[level].shape[0]
    path = torch.ones(T, 1, dtype=F64)  # (T, contexts of the top pool)
    for l in reversed(range(level, len(index))):
        path = (path.unsqueeze(-1) * weights[l]).reshape(T, -1)  # (T, F_l): weight of every slot
    s = route["probs"][level].shape[-1]
    gates = torch.zeros(T, s, dtype=F64)
    for t in range(T):
        for slot, e in enumerate(index[level][t].reshape(-1).tolist()):
            gates[t, e] = gates[t, e] + path[t, slot]
    return {"gates": gates, "probs": gates, "index": None, "margin": math.inf}



def _expert_linear(lin: ExpertLinear, i: int, u: Tensor, p, base: Tensor | None = None) -> Tensor:
    """Expert i's ``u Wᵀ + b + s (u A_iᵀ) B_iᵀ`` (``base`` replaces the frozen ``u Wᵀ + b``)."""
    if base is None:
        base = u @ p[lin.weight.name].T
        base = base + p[lin.bias.name] if lin.bias is not None else base
    if lin.a is None:
        return base
    return base + lin.scale * ((u @ p[lin.a.name][i].T) @ p[lin.b.name][i].T)


def _hidden(n, i: int, env, p) -> Tensor:
    x = env[n.src]
    up = _expert_linear(n.up, i, x, p, None if n.up_base is None else env[n.up_base])
    if n.gate is None:
        return block_activation(n.activation, up)
    gate = _expert_linear(n.gate, i, x, p, None if n.gate_base is None else env[n.gate_base])
    return block_activation(n.activation, gate) * up


def _expert_hidden(n: ExpertHidden, env, p) -> Tensor:
    E = env[n.routing]["gates"].shape[1]
    return torch.stack([_hidden(n, i, env, p) for i in range(E)])  # (E, T, d_ff)


def _expert_ffn(n: ExpertFFN, env, p) -> Tensor:
    g = env[n.routing]["gates"]  # (T, E)
    out = 0.0
    for i in range(g.shape[1]):
        out = out + g[:, i:i + 1] * _expert_linear(n.down, i, _hidden(n, i, env, p), p)
    return out


# ---- aux losses --------------------------------------------------------------------

def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return torch.zeros((), dtype=F64)
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def _aux(n: AuxLoss, route: dict, samples) -> Tensor:
    if "weights" in route:
        return tree_aux(n, route)
    gates, probs = route["gates"], route["probs"]
    T, E = gates.shape
    if n.kind == "switch_lb":
        counts = (gates > 0).to(F64).sum(0) if route["index"] is None else torch.bincount(
            route["index"].reshape(-1), minlength=E).to(F64)
        return n.weight * E * torch.sum(counts / T * probs.mean(0))
    if n.kind == "cv2_importance_load":
        return n.weight * (_cv2(gates.sum(0)) + _cv2((gates > 0).to(F64).sum(0)))
    sample_idx = torch.zeros(T, dtype=torch.long) if samples is None else samples[0]
    types = None if samples is None else samples[1]
    # the samples are those that hold a token, whatever their indices: Q has one row per such sample
    sample_idx = torch.unique(sample_idx, return_inverse=True)[1]
    M = int(sample_idx.max()) + 1
    Q = torch.zeros(M, E, dtype=F64).index_add(0, sample_idx, probs)
    coef = torch.ones(M, E, dtype=F64)
    if types is not None:
        group = torch.arange(E) * n.groups // E
        mtype = torch.zeros(M, dtype=torch.long).index_put((sample_idx,), types.long())
        same = group[None, :] == mtype[:, None]
        coef = torch.where(same, 1.0 + n.delta, 1.0 - n.delta).to(F64)
    return n.weight * _cv2((coef * Q).reshape(-1))
