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
from .nodes import (
    AbsTopK,
    Add,
    AuxLoss,
    BlockGate,
    Columns,
    DenseSoftmax,
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
    TreeMix,
    TreePathGates,
    TreePropagate,
    TreeRoute,
)
from .params import BlockColumns, BlockRows, Concat, ParamExpr, ParamRef, Pick

__all__ = ["interpret", "Result", "eval_expr"]

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
              samples: tuple[Tensor, Tensor | None] | None = None) -> Result:
    """Run ``graph`` on ``x (T, d_in)`` in float64 (autograd flows to ``params`` and ``x``).

    Args:
        params: every declared tensor by name.
        routing: fixed-routing mode, ``{router id: indices}``.
        samples: ``(sample index (T,), sample type (T,) or None)`` for localized balancing.
    """
    p = {k: v.to(F64) for k, v in params.items()}
    res = Result(output=torch.empty(0))
    env: dict[str, object] = {}
    fixed = dict(routing or {})
    for n in graph.nodes:
        env[n.id] = _run(n, env, p, x.to(F64), fixed, res, samples)
    res.output = env[graph.output]  # type: ignore[assignment]
    res.aux = {a: env[a] for a in graph.aux}  # type: ignore[misc]
    res.values = env
    return res


def _run(n, env, p, x, fixed, res: Result, samples):  # noqa: C901 - one case per node kind
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
            r = _tree_route(n, env[n.src], p, fixed.get(n.id))
            res.routes[n.id], res.margins[n.id] = r["index"], r["margin"]
            return r
        case TreeMix() | TreePropagate():
            return _tree_mix(n, env[n.src], env[n.routing], p)
        case AuxLoss():
            return _aux(n, env[n.routing], samples)
    raise TypeError(f"the interpreter has no rule for {type(n).__name__}")


def _stable_top(scores: Tensor, k: int) -> tuple[Tensor, float]:
    """Indices of the k largest (ties to the lower index) and the selection margin."""
    scores = scores.detach()
    order = torch.sort(scores, descending=True, stable=True).indices
    margin = math.inf if k >= scores.numel() else float(scores[order[k - 1]] - scores[order[k]])
    return order[:k], margin


def _route(n: Route, z: Tensor, p, fixed) -> dict:
    T, E = z.shape
    gates = torch.zeros(T, E, dtype=F64)
    g = n.gate
    if isinstance(g, DenseSoftmax):
        probs = torch.softmax(z / g.temperature, dim=1)
        return {"gates": probs, "probs": probs, "index": None, "margin": math.inf}
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
            sel, m = _stable_top(score[t], g.k)
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


def _act(name: str, v: Tensor) -> Tensor:
    return torch.tanh(v) if name == "tanh" else torch.relu(v) if name == "relu" else v


# ---- residual trees --------------------------------------------------------------------

def _tree_gate(n: TreeRoute, l: int, z: Tensor, p, fixed_sel) -> tuple[Tensor, Tensor, Tensor, float]:
    """One context at pool l: (selected experts, their weights, all probabilities, margin)."""
    lv = n.levels[l]
    h = _act(n.query_activation, p[lv.w1.name] @ z + p[lv.b1.name])
    q = p[lv.w2.name] @ h + p[lv.b2.name]
    K = p[lv.keys.name]
    if n.gate == "noisy_topk":
        qn = q / torch.clamp(q.norm(), min=1e-12)
        Kn = K / torch.clamp(K.norm(dim=1, keepdim=True), min=1e-12)
        logits = (Kn @ qn) / n.temperature
    else:
        logits = (K @ q) / n.temperature
    probs = torch.softmax(logits, 0)
    if n.gate == "dense":
        return torch.arange(lv.experts), probs, probs, math.inf
    score = probs if n.gate == "switch" else logits
    if fixed_sel is not None:
        sel, margin = torch.as_tensor(fixed_sel), math.inf
    else:
        sel, margin = _stable_top(score, lv.fanout)
    f, official = lv.fanout, n.conventions == "official"
    if n.gate == "switch":
        w = probs[sel] if (official and f == 1) else probs[sel] / probs[sel].sum()
    else:
        w = logits[sel] if (official and f == 1) else torch.softmax(logits[sel], 0)
    return sel, w, probs, margin


def _tree_route(n: TreeRoute, xd: Tensor, p, fixed) -> dict:
    """Route every token top-down; record per pool index/weight ``(T, F_{l+1}, f_l)``."""
    L = len(n.levels)
    idx = [[] for _ in range(L)]
    wts = [[] for _ in range(L)]
    probs = [[] for _ in range(L)]
    margin = math.inf
    for t in range(xd.shape[0]):
        contexts = [xd[t]]  # router inputs of the contexts at the current pool, top-major order
        for l in reversed(range(L)):
            K = p[n.levels[l].keys.name]
            rows_i, rows_w, rows_p, nxt = [], [], [], []
            for c, z in enumerate(contexts):
                fs = None if fixed is None else fixed[l][t][c]
                sel, w, pr, m = _tree_gate(n, l, z, p, fs)
                margin = min(margin, m)
                rows_i.append(sel)
                rows_w.append(w)
                rows_p.append(pr)
                for e in sel.tolist():
                    key = K[e] / torch.clamp(K[e].norm(), min=1e-12) if n.gate == "noisy_topk" else K[e]
                    nxt.append(torch.cat([z, key]))
            idx[l].append(torch.stack(rows_i))
            wts[l].append(torch.stack(rows_w))
            probs[l].append(torch.stack(rows_p))
            contexts = nxt
    index = tuple(torch.stack(i) for i in idx)
    return {"index": index, "weights": tuple(torch.stack(w) for w in wts),
            "probs": tuple(torch.stack(q) for q in probs), "margin": margin}


def _tree_mix(n, src: Tensor, route: dict, p) -> Tensor:
    """Bottom-up propagation, token by token."""
    levels = n.levels
    offsets, off = [], 0
    for lv in levels:
        offsets.append(off)
        off += lv.b.shape[0] * lv.b.shape[2]
    outs = []
    for t in range(src.shape[0]):

        def down(l: int, e: int) -> Tensor:
            lv = levels[l]
            if isinstance(n, TreePropagate):
                r = lv.b.shape[2]
                return src[t, offsets[l] + e * r: offsets[l] + (e + 1) * r]
            v = p[lv.a.name][e] @ src[t]
            return v + p[lv.a_bias.name][e] if lv.a_bias is not None else v

        def residual(l: int, e: int) -> Tensor:
            lv = levels[l]
            u = p[lv.b.name][e] @ down(l, e)
            u = u + p[lv.b_bias.name][e] if lv.b_bias is not None else u
            return lv.scale * u

        def node(l: int, ctx: int) -> Tensor:
            """Hidden of the node at level l+1 whose children come from pool l, context ctx."""
            lv = levels[l]
            sel, w = route["index"][l][t, ctx], route["weights"][l][t, ctx]
            f = sel.shape[0]
            h = torch.zeros(lv.b.shape[1], dtype=F64)
            for pos in range(f):
                u = residual(l, int(sel[pos]))
                if l > 0:
                    u = u + p[lv.w.name] @ node(l - 1, ctx * f + pos)
                    u = u + p[lv.w_bias.name] if lv.w_bias is not None else u
                h = h + w[pos] * _act(n.activation, u)
            return h

        outs.append(node(len(levels) - 1, 0))
    return torch.stack(outs)


# ---- aux losses --------------------------------------------------------------------

def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return torch.zeros((), dtype=F64)
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def _aux(n: AuxLoss, route: dict, samples) -> Tensor:
    if isinstance(route.get("index"), tuple) or "weights" in route:
        return _tree_aux(n, route)
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
    M = int(sample_idx.max()) + 1
    Q = torch.zeros(M, E, dtype=F64).index_add(0, sample_idx, probs)
    coef = torch.ones(M, E, dtype=F64)
    if types is not None:
        group = torch.arange(E) * n.groups // E
        mtype = torch.zeros(M, dtype=torch.long).index_put((sample_idx,), types.long())
        same = group[None, :] == mtype[:, None]
        coef = torch.where(same, 1.0 + n.delta, 1.0 - n.delta).to(F64)
    return n.weight * _cv2((coef * Q).reshape(-1))


def _tree_aux(n: AuxLoss, route: dict) -> Tensor:
    total = torch.zeros((), dtype=F64)
    for idx, w, probs in zip(route["index"], route["weights"], route["probs"]):
        T, C, f = idx.shape
        s = probs.shape[-1]
        if f == s and n.kind == "switch_lb":
            continue  # dense pools carry no balance loss
        if n.kind == "switch_lb":
            counts = torch.bincount(idx.reshape(-1), minlength=s).to(F64)
            total = total + n.weight * s * torch.sum(counts / (T * C) * probs.reshape(-1, s).mean(0))
        else:
            dense = torch.zeros(T * C, s, dtype=F64).scatter(1, idx.reshape(T * C, f), w.reshape(T * C, f))
            load = (dense > 0).to(F64).sum(0)
            total = total + n.weight * (_cv2(dense.sum(0)) + _cv2(load))
    return total
