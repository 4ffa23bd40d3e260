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
from typing import Callable, Mapping

import torch
from torch import Tensor

from . import interpret_basics, interpret_dora, interpret_kronecker, interpret_xlora, nodes
from .graph import Graph
from .interpret_block_dropout import block_keeps
from .interpret_dora import block_dora_scale
from .interpret_top_p import top_p_aux, top_p_gate
from .interpret_tree import stable_top, tree_aux, tree_mix, tree_route
from .nodes import ExpertHidden, ExpertLinear
from .params import BlockColumns, BlockRows, Concat, ParamExpr, ParamRef, Pick
from .rules import Rules
from .task_nodes import task_labels
from .values import Routing, TreeRouting

__all__ = ["interpret", "Result", "eval_expr", "block_activation", "RUN", "GATES"]

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
    """Every node's value: tensors, :class:`~moleforge.ir.values.Routing`,
    :class:`~moleforge.ir.values.TreeRouting`."""

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


@dataclass
class _Run:
    """What the rules read: the values so far, the float64 parameters, the input, the
    fixed routing, the training noise, the samples; and the result being filled."""

    env: dict[str, object]
    p: dict[str, Tensor]
    x: Tensor
    fixed: dict[str, object]
    noise: dict[str, tuple[Tensor, ...]]
    samples: tuple[Tensor, Tensor | None] | None
    res: Result
    training: bool = False
    scalings: Tensor | None = None


RUN: Rules[Callable[[object, _Run], object]] = Rules("the interpreter", nodes.NODE_KINDS)
"""Node kind -> ``(node, run) -> value``."""

GATES: Rules[Callable[..., tuple[Routing, float]]] = Rules("the interpreter's gates", nodes.GATE_KINDS)
"""Gate kind -> ``(gate, scores z (T, E), params, experts, fixed indices or None) -> (routing, margin)``."""


def interpret(graph: Graph, params: Mapping[str, Tensor], x: Tensor, *,
              routing: Mapping[str, object] | None = None,
              samples: tuple[Tensor, Tensor | None] | None = None,
              noise: Mapping[str, tuple[Tensor, ...]] | None = None, training: bool = False,
              scalings: Tensor | None = None) -> Result:
    """Run ``graph`` on ``x (T, d_in)`` in float64 (autograd flows to ``params`` and ``x``).

    Args:
        params: every declared tensor by name.
        routing: fixed-routing mode, ``{router id: indices}``.
        samples: ``(sample index (T,), sample type (T,) or None)`` for localized balancing.
        noise: training mode: of noisy tree gates, ``{tree router id: (ε_0, ..., ε_{L-1})}``,
            ``ε_l (T, C_l, s_l)`` standard normal (see :class:`~moleforge.ir.nodes.TreeRoute`); of
            router jitter, ``{jitter id: (u,)}``, ``u (T, width)`` uniform on ``[0, 1)`` (see
            :class:`~moleforge.ir.nodes.Jitter`); of a mode-dependent gate (MoRA-CL's self-activated
            one), ``{router id: ()}``; of FFN-block experts with dropout, ``{block node id: (ν, ...)}``, one
            ``ν (T, k, width)`` per LoRA (``ir/block_nodes.py``). Nodes without noise run as in evaluation.
        training: the mode of gates that differ between training and evaluation
            (:class:`~moleforge.ir.nodes.DenseTrainTopK`).
        scalings: X-LoRA: the site's scalings ``(T, E)`` for the call
            (:class:`~moleforge.ir.nodes.LayerScalings`).
    """
    p = {k: v.to(F64) for k, v in params.items()}
    res = Result(output=torch.empty(0))
    run = _Run(env={}, p=p, x=x.to(F64), fixed=dict(routing or {}), noise=dict(noise or {}), samples=samples,
               res=res, training=training, scalings=scalings)
    for n in graph.nodes:
        run.env[n.id] = RUN[n](n, run)
    res.output = run.env[graph.output]  # type: ignore[assignment]
    res.aux = {a: run.env[a] for a in graph.aux}  # type: ignore[misc]
    res.values = run.env
    return res


def _linear(n, r: _Run) -> Tensor:
    out = r.env[n.src] @ eval_expr(n.weight, r.p).T
    out = n.scale * out if isinstance(n, nodes.Linear) else out
    return out + eval_expr(n.bias, r.p) if n.bias is not None else out


RUN.add(lambda n, r: r.x, nodes.Input)
RUN.add(_linear, nodes.Linear, nodes.SiblingLinear)
RUN.add(lambda n, r: r.env[n.src][:, n.start:n.stop], nodes.Columns)
RUN.add(lambda n, r: sum(r.env[s] for s in n.srcs[1:]) + r.env[n.srcs[0]], nodes.Add)
RUN.add(lambda n, r: _path_gates(r.env[n.routing], n.level), nodes.TreePathGates)
RUN.add(lambda n, r: tree_mix(n, r.env[n.src], r.env[n.routing], r.p), nodes.TreeMix, nodes.TreePropagate)
RUN.add(lambda n, r: _aux(n, r.env[n.routing], r.samples), nodes.AuxLoss)


@RUN.register(nodes.Jitter)
def _jitter(n, r: _Run) -> Tensor:
    """Evaluation: the identity. Training (``noise[id] = (u,)``): ``src · (1 - ε + 2ε·u)``."""
    if n.id not in r.noise:
        return r.env[n.src]
    u = r.noise[n.id][0].to(F64)
    return r.env[n.src] * (1.0 - n.eps + 2.0 * n.eps * u)


@RUN.register(nodes.GateBias)
def _gate_bias(n, r: _Run) -> Tensor:
    g, bias = r.env[n.routing].gates, eval_expr(n.bias, r.p)
    return n.scale * (g @ bias if bias.dim() == 2 else g.sum(1, keepdim=True) * bias)


@RUN.register(nodes.TaskScores)
def _task_scores(n: nodes.TaskScores, r: _Run) -> Tensor:
    """``z = (src if token_scores else 0) + (table[t] or onehot(t))`` per token."""
    t = task_labels(r.samples, n.tasks, f"router {n.origin or n.id}")
    add = eval_expr(n.table, r.p)[t] if n.table is not None else torch.nn.functional.one_hot(t, n.experts).to(F64)
    return r.env[n.src] + add if n.token_scores else add


@RUN.register(nodes.Route)
def _route(n, r: _Run) -> Routing:
    gate = n.gate.in_mode(r.training)
    mode = {"training": n.id in r.noise} if gate.mode_dependent else {}
    routing, margin = GATES[gate](gate, r.env[n.src], r.p, n.experts, r.fixed.get(n.id), **mode)
    r.res.routes[n.id], r.res.margins[n.id] = routing.index, margin
    return routing


@RUN.register(nodes.TreeRoute)
def _tree_route(n, r: _Run) -> TreeRouting:
    routing, margin = tree_route(n, r.env[n.src], r.p, r.fixed.get(n.id), r.noise.get(n.id))
    r.res.routes[n.id], r.res.margins[n.id] = routing.indices, margin
    return routing


@RUN.register(nodes.PoolMix, nodes.GroupedMix)
def _pool_mix(n, r: _Run) -> Tensor:
    return _pool(r.env[n.src], r.env[n.routing].gates, eval_expr(n.a, r.p), eval_expr(n.b, r.p), n.scale)


@RUN.register(nodes.BlockGate)
def _block_gate(n, r: _Run) -> Tensor:
    g = r.env[n.routing].gates * n.scale
    return r.env[n.src] * torch.repeat_interleave(g, n.rank, dim=1)


@RUN.register(nodes.OuterGate)
def _outer_gate(n, r: _Run) -> Tensor:
    g, h = r.env[n.routing].gates, r.env[n.src]
    return torch.cat([g[:, i:i + 1] * h for i in range(g.shape[1])], 1) * n.scale


@RUN.register(nodes.CoreExperts)
def _core_experts(n, r: _Run) -> Tensor:
    g, h, M, B = r.env[n.routing].gates, r.env[n.src], eval_expr(n.cores, r.p), eval_expr(n.b, r.p)
    return sum(g[:, i:i + 1] * n.scale * ((h @ M[i].T) @ B.T) for i in range(g.shape[1]))  # (T, d_out)


@RUN.register(nodes.CoreMerge)
def _core_merge(n, r: _Run) -> Tensor:
    g, h, M = r.env[n.routing].gates, r.env[n.src], eval_expr(n.cores, r.p)
    merged = torch.einsum("te,eoi->toi", g, M)  # (T, r, r): each token's soft-merged core
    return torch.einsum("toi,ti->to", merged, h)  # (T, r)


@RUN.register(nodes.ExpertSum)
def _expert_sum(n, r: _Run) -> Tensor:
    g, h = r.env[n.routing].gates, r.env[n.src]  # (T, E), (E, T, d_ff)
    return sum(g[:, i:i + 1] * h[i] for i in range(g.shape[1]))


@RUN.register(nodes.ExpertLoRA)
def _expert_lora(n, r: _Run) -> Tensor:
    g, h, A, B = r.env[n.routing].gates, r.env[n.src], r.p[n.a.name], r.p[n.b.name]
    keep = block_keeps(n, r, ("down",)).get("down")  # (E, T, d_ff): the dropped h in training
    h = h if keep is None else h * keep
    return sum(g[:, i:i + 1] * n.scale * ((h[i] @ A[i].T) @ B[i].T) for i in range(g.shape[1]))


# ---- gates ------------------------------------------------------------------------------

@GATES.register(nodes.DenseSoftmax)
def _dense(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    probs = torch.softmax(z / g.temperature, dim=1)
    return Routing(probs, probs), math.inf


@GATES.register(nodes.StaticGate)
def _static(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    T = z.shape[0]
    w = p[g.weights.name]  # (E,); z is the site input, read only for T
    gates = w.expand(T, experts)  # (T, E): the same weights for every token
    probs = (w.abs() / w.abs().sum().clamp_min(1e-12)).expand(T, experts)  # (T, E)
    return Routing(gates, probs), math.inf


GATES.add(top_p_gate, nodes.TopPTsallis)


@GATES.register(nodes.SelfActivated)
def _self_activated(g, z: Tensor, p, experts: int, fixed, training: bool = False) -> tuple[Routing, float]:
    """MoRA-CL: ``w = softmax(|h| / τ)``; training the top-k of w, evaluation ``w >= threshold``;
    the evaluation margin is the smallest distance of a score from the threshold."""
    w = torch.softmax(z.abs() / g.temperature, 1)  # (T, R)
    if training:
        return _top_k(w, w, g.k, fixed, lambda v: v)
    gates = torch.where(w >= g.threshold, w, 0.0)  # (T, R)
    margin = float((w.detach() - g.threshold).abs().min()) if w.numel() else math.inf
    return Routing(gates, w), margin


@GATES.register(nodes.DenseTrainTopK)
def _dense_train_topk(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    """Evaluation (``_route`` asks the gate for the training one when training)."""
    return _softmax_topk(g.in_mode(False), z, p, experts, fixed)


@GATES.register(nodes.SoftmaxTopK)
def _softmax_topk(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    probs = torch.softmax(z / g.temperature, 1)
    return _top_k(probs, probs, g.k, fixed, lambda v: v / v.sum() if g.renormalize else v)


@GATES.register(nodes.SigmoidTopK)
def _sigmoid_topk(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    probs = torch.sigmoid(z)
    return _top_k(probs + p[g.balance.name], probs, g.k, fixed, lambda v: g.k * v / v.sum())


@GATES.register(nodes.AbsTopK)
def _abs_topk(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    routing, margin = _top_k((z + p[g.balance.name]).abs(), None, g.k, fixed, lambda v: 1.0)
    return routing._replace(probs=routing.gates), margin  # the mask is its own probability


def _top_k(score: Tensor, probs, k: int, fixed, value: Callable) -> tuple[Routing, float]:
    """Per token the k largest scores (or the ``fixed`` indices); gates ``value(kept scores)``
    at the kept experts, 0 elsewhere."""
    T, E = score.shape
    gates = torch.zeros(T, E, dtype=F64)
    rows, index, margin = [], [], math.inf
    for t in range(T):
        if fixed is not None:
            sel = torch.as_tensor(fixed[t])
        else:
            sel, m = stable_top(score[t], k)
            margin = min(margin, m)
        index.append(sel)
        row = gates[t].clone()
        row[sel] = value(score[t, sel])
        rows.append(row)
    return Routing(torch.stack(rows), probs, torch.stack(index)), margin


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


def _path_gates(route: TreeRouting, level: int) -> Routing:
    """``ĝ (T, s_l)``: per expert of pool ``level``, the sum over its tree nodes of the product
    of the weights on the path from the root (the context of pool l is the slot
    ``c·f_{l+1} + p`` of pool l+1)."""
    index, weights = route.indices, route.weights
    T = index[level].shape[0]
    path = torch.ones(T, 1, dtype=F64)  # (T, contexts of the top pool)
    for l in reversed(range(level, len(index))):
        path = (path.unsqueeze(-1) * weights[l]).reshape(T, -1)  # (T, F_l): weight of every slot
    s = route.probs[level].shape[-1]
    gates = torch.zeros(T, s, dtype=F64)
    for t in range(T):
        for slot, e in enumerate(index[level][t].reshape(-1).tolist()):
            gates[t, e] = gates[t, e] + path[t, slot]
    return Routing(gates, gates)

def _expert_linear(lin: ExpertLinear, i: int, u: Tensor, p, base: Tensor | None = None,
                   keep: Tensor | None = None) -> Tensor:
    """Expert i's ``u Wᵀ + b + s (u A_iᵀ) B_iᵀ`` (``base`` replaces the frozen ``u Wᵀ + b``; with
    ``keep (E, T, width)`` the LoRA reads ``u ⊙ keep[i]``, its dropped input)."""
    if base is None:
        base = u @ p[lin.weight.name].T
        base = base + p[lin.bias.name] if lin.bias is not None else base
    if lin.a is None:
        return base
    lora_in = u if keep is None else u * keep[i]
    out = base + lin.scale * ((lora_in @ p[lin.a.name][i].T) @ p[lin.b.name][i].T)
    return out if lin.magnitude is None else block_dora_scale(lin, i, p) * out


def _hidden(n, i: int, env, p, keeps: Mapping[str, Tensor]) -> Tensor:
    x = env[n.src]
    up = _expert_linear(n.up, i, x, p, None if n.up_base is None else env[n.up_base], keeps.get("up"))
    if n.gate is None:
        return block_activation(n.activation, up)
    gate = _expert_linear(n.gate, i, x, p, None if n.gate_base is None else env[n.gate_base], keeps.get("gate"))
    return block_activation(n.activation, gate) * up


@RUN.register(nodes.ExpertHidden)
def _expert_hidden(n: ExpertHidden, r: _Run) -> Tensor:
    E = r.env[n.routing].gates.shape[1]
    keeps = block_keeps(n, r, ("gate", "up"))
    return torch.stack([_hidden(n, i, r.env, r.p, keeps) for i in range(E)])  # (E, T, d_ff)


@RUN.register(nodes.ExpertFFN)
def _expert_ffn(n: nodes.ExpertFFN, r: _Run) -> Tensor:
    g = r.env[n.routing].gates  # (T, E)
    keeps = block_keeps(n, r, ("gate", "up", "down"))
    out = 0.0
    for i in range(g.shape[1]):
        h = _hidden(n, i, r.env, r.p, keeps)  # (T, d_ff)
        out = out + g[:, i:i + 1] * _expert_linear(n.down, i, h, r.p, keep=keeps.get("down"))
    return out


# ---- aux losses --------------------------------------------------------------------

def _cv2(v: Tensor) -> Tensor:
    if v.numel() < 2:
        return torch.zeros((), dtype=F64)
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def _rsl(n: nodes.AuxLoss, probs: Tensor) -> Tensor:
    """LoRA-Mixer: ``weight · Σ_i P_i f_i - entropy · mean_t H(p_t)``, ``f_i`` expert i's share of
    the top-``top_k`` selections of the probabilities, ``P_i`` its mean probability."""
    T, E = probs.shape
    counts = torch.zeros(E, dtype=F64)
    for t in range(T):
        counts[stable_top(probs[t].detach(), n.top_k)[0]] += 1
    share = counts / (T * n.top_k)
    entropy = -(probs * torch.log(probs)).sum(1).mean()
    return n.weight * torch.sum(probs.mean(0) * share) - n.entropy * entropy


def _aux(n: nodes.AuxLoss, route: Routing | TreeRouting, samples) -> Tensor:
    if isinstance(route, TreeRouting):
        return tree_aux(n, route)
    if n.kind in ("tsallis_entropy", "soft_lb"):
        return top_p_aux(n, route)
    gates, probs = route.gates, route.probs
    T, E = gates.shape
    if n.kind == "switch_lb":
        counts = (gates > 0).to(F64).sum(0) if route.index is None else torch.bincount(
            route.index.reshape(-1), minlength=E).to(F64)
        return n.weight * E * torch.sum(counts / T * probs.mean(0))
    if n.kind == "cv2_importance_load":
        return n.weight * (_cv2(gates.sum(0)) + _cv2((gates > 0).to(F64).sum(0)))
    if n.kind == "rsl":
        return _rsl(n, probs)
    if n.kind == "task_routing":
        if samples is None or samples[1] is None:  # no labels (inference): no supervised loss
            return torch.zeros((), dtype=F64)
        label = task_labels(samples, E, f"aux loss {n.origin or n.id}")
        logp = torch.log_softmax(torch.log(probs) / n.temperature, 1)  # (T, E)
        return -n.weight * logp[torch.arange(T), label].mean()
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


# ---- input dropout, capacity, z-loss, ragged pools, DoRA (basics_nodes) ---------------------

RUN.add(interpret_basics.run_dropout, nodes.Dropout)
RUN.add(interpret_basics.run_capacity, nodes.CapacityLimit)
RUN.add(interpret_basics.run_z_loss, nodes.ZLoss)
RUN.add(interpret_basics.run_ragged_mix, nodes.RaggedMix)
RUN.add(interpret_basics.run_magnitude, nodes.Magnitude)

# ---- X-LoRA (xlora_nodes) ---------------------------------------------------------------------

RUN.add(lambda n, r: interpret_xlora.run_layer_scalings(n, r.env[n.src], r.scalings), nodes.LayerScalings)
GATES.add(interpret_xlora.xlora_gate, nodes.XLoRAScale)

# ---- EPT: Kronecker experts, task embeddings, frequency compensation, contrastive loss ---------

RUN.add(interpret_kronecker.run_kronecker_mix, nodes.KroneckerMix)
RUN.add(interpret_kronecker.run_task_embed, nodes.TaskEmbed)
RUN.add(interpret_kronecker.run_task_scale, nodes.TaskScale)
RUN.add(interpret_kronecker.run_task_contrastive, nodes.TaskContrastive)
RUN.add(interpret_dora.run_pool_magnitude, nodes.PoolMagnitude)  # DoRA experts
RUN.add(lambda n, r: n.weight * sum(((r.p[c.name] - r.p[s.name]) ** 2).sum() for c, s in n.pairs),
        nodes.Preserve)  # LoRA-Mixer's L_preserve: weight · Σ ‖θ − θ⁰‖²
