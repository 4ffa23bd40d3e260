"""IR -> ``torch.fx.GraphModule``: one emitter per node kind.

The generated module's ``forward(x, samples=None, acc=None, mask=None)`` takes ``x (T, d_in)``
(and, for graphs with frozen inputs, ``frozen``: ``{name: tensor}`` of the model's tensors) and returns
``(delta (T, d_out), aux, routes)``: ``aux`` is the site's summed aux loss (or ``None``),
``routes`` maps each router id to its routing value (flat: a :class:`~moleforge.ir.Routing`
``(gates, probs, index)``; tree: a :class:`~moleforge.ir.TreeRouting` ``(indices, weights, probs,
gate, smooth_load)``) for routing statistics.
Its ``.code`` reads like the IR it came from.

A :class:`SiblingLinear` whose group is given to :func:`lower` reads its columns of the group's
one GEMM (``siblings.SiblingGroup``); without its group it is a plain linear.

The ops with a kernel choice (sparse pools, residual trees, routed FFN blocks) get the module's
kernel policy (``runtime/policy.py``), its constant attribute ``kernel_policy``, as their
``policy`` argument; the C++ CPU kernel is built here when that policy may choose it.

The decode path (``runtime/ops_decode.py``): tensors built from weights alone (fused
down-projections, block columns, tree tables) go through the module's ``pack_cache``
(``runtime/packed.py``), which keeps them between forwards without autograd; the aux losses
read the module's ``eval_aux`` (``False``: none in evaluation mode without autograd).
"""

from __future__ import annotations

import operator
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import LoweringError
from ...ir import (
    BlockColumns,
    BlockRows,
    Concat,
    Graph,
    MissingRuleError,
    ParamExpr,
    ParamRef,
    Pick,
    Routing,
    Rules,
    TreeRouting,
    TreeRoutingType,
    expr_shape,
    format_expr,
    nodes,
)
from ..runtime import ops, ops_core, ops_linear, ops_mixer, ops_preserve, ops_task, ops_top_p, ops_xlora
from ..runtime.dist import WORLD
from ..runtime.packed import PackCache, packed_cat, packed_columns
from ..runtime.policy import KernelPolicy
from ..runtime.siblings import SiblingGroup
from . import lower_basics, lower_block, lower_dora, lower_kronecker
from .lower_block import runs_as_routed_ffn
from .lower_decode import pool_decode_form
from .lower_kernels import with_cpu_build
from .lower_routed import emit_routed_pool, routed_pool_of
from .lower_tree import emit_tree, emit_tree_aux, emit_tree_route, routing_field

__all__ = ["lower", "counts_name", "runs_as_routed_ffn", "EMIT", "ROUTE"]

EMIT: Rules[Callable[["_Ctx", object], fx.Node]] = Rules("the torch emitter", nodes.NODE_KINDS)
"""Node kind -> ``(ctx, node) -> fx node`` of its value."""

ROUTE: Rules[Callable[["_Ctx", nodes.Route], fx.Node]] = Rules("the torch emitter's gates", nodes.GATE_KINDS)
"""Gate kind -> ``(ctx, route) -> fx node`` of the :class:`~moleforge.ir.Routing`."""


def counts_name(balance: str) -> str:
    """Name of the selection-count buffer of a balancing bias."""
    return f"{balance}_counts"


class _Ctx:
    def __init__(self, graph: Graph, groups: Mapping[str, SiblingGroup], policy: KernelPolicy):
        self.groups = groups
        self.policy = policy
        self._policy: fx.Node | None = None
        self._pack_cache: fx.Node | None = None
        self._eval_aux: fx.Node | None = None
        self.ir = graph
        self.g = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.exprs: dict[ParamExpr, fx.Node] = {}
        self.x = self.g.placeholder("x")
        self.samples = self.g.placeholder("samples", default_value=None)
        self.frozen_names = {d.name for d in graph.frozen}
        self.frozen = self.g.placeholder("frozen", default_value=None) if graph.frozen else None
        self.acc = self.g.placeholder("acc", default_value=None)
        self.mask = self.g.placeholder("mask", default_value=None)
        self.plans: dict[str, fx.Node] = {}
        self._training: fx.Node | None = None
        self._stat_group: fx.Node | None = None
        self._names: set[str] = set()
        self.fused: dict[str, fx.Node] = {}
        """Node id -> an input another emitter already computed for it (lower_tree)."""

    def call(self, fn: Callable, args: tuple, name: str, kwargs: dict | None = None) -> fx.Node:
        base = name.replace(".", "_")
        unique, i = base, 1
        while unique in self._names:
            unique, i = f"{base}_{i}", i + 1
        self._names.add(unique)
        return self.g.create_node("call_function", fn, args, kwargs or {}, name=unique)

    @property
    def kernels(self) -> dict[str, fx.Node]:
        """``policy=``: the module's kernel policy, for the ops that choose a kernel."""
        if self._policy is None:
            self._policy = self.g.get_attr("kernel_policy")
        return {"policy": self._policy}

    @property
    def training(self) -> fx.Node:
        if self._training is None:
            self._training = self.g.get_attr("training")
        return self._training

    @property
    def stat_group(self) -> fx.Node:
        """The module's ``stat_group``: the ranks its aux losses sum their statistics over
        (``runtime/dist.py``)."""
        if self._stat_group is None:
            self._stat_group = self.g.get_attr("stat_group")
        return self._stat_group

    def item(self, node: fx.Node, i: int | str, name: str) -> fx.Node:
        return self.call(operator.getitem, (node, i), name)

    def expr(self, e: ParamExpr) -> fx.Node:
        if e in self.exprs:
            return self.exprs[e]
        match e:
            case ParamRef(name=n) if n in self.frozen_names:
                out = self.item(self.frozen, n, n)  # type: ignore[arg-type]
            case ParamRef(name=n):
                out = self.g.get_attr(n)
            case BlockRows(src=s):
                out = self.call(ops.block_rows, (self.expr(s),), f"rows_{format_expr(s)}")
            case BlockColumns(src=s):
                out = self.call(packed_columns, (self.pack_cache, f"cols_{format_expr(s)}", self.expr(s)),
                                f"cols_{format_expr(s)}")
            case Pick(src=s, index=i) if expr_shape(s)[0] == 1:  # a shared factor: a view, no copy back
                out = self.call(torch.squeeze, (self.expr(s), 0), f"{format_expr(s)}_{i}")
            case Pick(src=s, index=i):
                out = self.item(self.expr(s), i, f"{format_expr(s)}_{i}")
            case Concat(parts=ps, dim=0):
                out = self._cat(self._whole_rows(ps), 0)
            case Concat(parts=ps, dim=d):
                out = self._cat([self.expr(p) for p in ps], d)
            case _:
                raise LoweringError(f"no lowering for parameter expression {e!r}")
        self.exprs[e] = out
        return out

    @property
    def eval_aux(self) -> dict[str, fx.Node]:
        """``eval_aux=``: the module's ``eval_aux``, whether its aux losses are computed in
        evaluation mode without autograd too (``ops_decode.aux_wanted``)."""
        if self._eval_aux is None:
            self._eval_aux = self.g.get_attr("eval_aux")
        return {"eval_aux": self._eval_aux}

    @property
    def pack_cache(self) -> fx.Node:
        """The module's :class:`~moleforge.backends.runtime.packed.PackCache`: weight-only
        tensors kept between forwards without autograd (the decode path)."""
        if self._pack_cache is None:
            self._pack_cache = self.g.get_attr("pack_cache")
        return self._pack_cache

    def _cat(self, parts: list[fx.Node], dim: int) -> fx.Node:
        name = "fused_weight"
        unique, i = name, 1
        while unique in self._names:
            unique, i = f"{name}_{i}", i + 1
        return self.call(packed_cat, (self.pack_cache, unique, parts, dim), name)

    def _whole_rows(self, parts: tuple[ParamExpr, ...]) -> list[fx.Node]:
        """The parts of a row concatenation, with each run ``Pick(p, 0), ..., Pick(p, E-1)`` that
        covers all of ``p`` taken as ``p`` flattened to rows: the same values, and one view in
        the backward instead of a zero-filled copy per slice."""
        out, i = [], 0
        while i < len(parts):
            p = parts[i]
            if isinstance(p, Pick) and p.index == 0:
                n = expr_shape(p.src)[0]
                run = parts[i:i + n]
                if len(run) == n and all(isinstance(q, Pick) and q.src == p.src and q.index == k
                                         for k, q in enumerate(run)):
                    shape = expr_shape(p.src)
                    rows = (n * shape[1], *shape[2:]) if len(shape) > 1 else (n,)
                    out.append(self.call(torch.reshape, (self.expr(p.src), rows), f"{format_expr(p.src)}_rows"))
                    i += n
                    continue
            out.append(self.expr(p))
            i += 1
        return out

    def opt(self, e: ParamExpr | None):
        return None if e is None else self.expr(e)


@EMIT.register(nodes.Linear)
def _linear(c: _Ctx, n: nodes.Linear) -> fx.Node:
    out = c.call(ops_linear.linear, (c.env[n.src], c.expr(n.weight), c.opt(n.bias)), n.id)
    if n.scale != 1.0:
        if n.bias is not None:
            raise LoweringError(f"%{n.id}: a scaled linear with a bias is not lowered; fold the scale first")
        out = c.call(operator.mul, (out, n.scale), f"{n.id}_scaled")
    return out


def _tiling(graph: Graph, src: str) -> list[nodes.Columns] | None:
    """The column slices of ``src`` when they cover it exactly, in order (a fused GEMM's parts)."""
    parts = sorted((u for u in graph.users(src) if isinstance(u, nodes.Columns)), key=lambda u: u.start)
    if len(parts) < 2 or len(parts) != len(graph.users(src)):
        return None
    bounds = [0] + [p.stop for p in parts]
    if [p.start for p in parts] != bounds[:-1] or bounds[-1] != graph.width(src):
        return None
    return parts


@EMIT.register(nodes.Columns)
def _columns(c: _Ctx, n: nodes.Columns) -> fx.Node:
    """A slice; when the slices tile their source, one ``split`` for all of them, whose backward
    is one concatenation instead of a zero-filled full-width gradient per slice."""
    parts = _tiling(c.ir, n.src)
    if parts is None:
        return c.call(operator.getitem, (c.env[n.src], (slice(None), slice(n.start, n.stop))), n.id)
    key = f"{n.src}_parts"
    if key not in c.env:
        c.env[key] = c.call(torch.split, (c.env[n.src], [p.stop - p.start for p in parts], 1), key)
    return c.item(c.env[key], [p.id for p in parts].index(n.id), n.id)


@EMIT.register(nodes.SiblingLinear)
def _sibling(c: _Ctx, n: nodes.SiblingLinear) -> fx.Node:
    own = (c.env[n.src], c.expr(n.weight), c.opt(n.bias))
    if n.group not in c.groups:
        return c.call(F.linear, own, n.id)
    return c.call(ops.sibling_linear, own + (c.g.get_attr("sibling_group"), n.start, n.stop), n.id, c.kernels)


EMIT.add(lambda c, n: c.x, nodes.Input)
EMIT.add(lambda c, n: c.call(ops.add_aux, tuple(c.env[s] for s in n.srcs), n.id), nodes.Add)
EMIT.add(lambda c, n: c.call(ops.jitter, (c.env[n.src], n.eps, c.training, c.g.get_attr("noise_generator")), n.id),
         nodes.Jitter)
EMIT.add(lambda c, n: ROUTE[n.gate](c, n), nodes.Route)
EMIT.add(lambda c, n: c.call(ops_task.task_scores, (c.env[n.src], c.opt(n.table), c.samples, n.experts, n.tasks,
                                                     n.token_scores, f"router {n.origin or n.id}"), n.id),
         nodes.TaskScores)


def _balanced(c: _Ctx, n: nodes.Route, op: Callable) -> fx.Node:
    """A gate with a balancing bias: it also counts its selections into a buffer."""
    g = n.gate
    bias = c.expr(g.balance)
    counts = c.g.get_attr(counts_name(g.balance.name))
    return c.call(op, (c.env[n.src], bias, counts, g.k, c.training, c.mask), n.id)


def _softmax_topk(c: _Ctx, n: nodes.Route) -> fx.Node:
    mix = routed_pool_of(c.ir, n)
    if mix is not None:  # router, gate and pool as one op (lower_routed)
        return emit_routed_pool(c, n, mix)
    return c.call(ops.route_softmax_topk, (c.env[n.src], n.gate.k, n.gate.renormalize, n.gate.temperature), n.id)


ROUTE.add(_softmax_topk, nodes.SoftmaxTopK)
ROUTE.add(lambda c, n: c.call(ops.route_dense, (c.env[n.src], n.gate.temperature), n.id), nodes.DenseSoftmax)
ROUTE.add(lambda c, n: c.call(ops.route_static, (c.env[n.src], c.expr(n.gate.weights)), n.id), nodes.StaticGate)
ROUTE.add(lambda c, n: c.call(ops_mixer.route_dense_train_topk, (c.env[n.src], n.gate.infer_k, n.gate.renormalize,
                                                                 n.gate.temperature, c.training), n.id),
          nodes.DenseTrainTopK)
ROUTE.add(lambda c, n: _balanced(c, n, ops.route_sigmoid_topk), nodes.SigmoidTopK)
ROUTE.add(lambda c, n: _balanced(c, n, ops.route_abs_topk), nodes.AbsTopK)
ROUTE.add(lambda c, n: c.call(ops_top_p.route_top_p, (c.env[n.src], n.gate.k, n.gate.top_p, n.gate.q,
                                                     n.gate.threshold), n.id), nodes.TopPTsallis)
ROUTE.add(lambda c, n: c.call(ops_top_p.route_self_activated, (c.env[n.src], n.gate.k, n.gate.temperature,
                                                              n.gate.threshold, c.training), n.id), nodes.SelfActivated)


def _gates(c: _Ctx, rid: str) -> fx.Node:
    return routing_field(c, rid, Routing, "gates", f"{rid}_gates")


@EMIT.register(nodes.PoolMix, nodes.GroupedMix)
def _pool(c: _Ctx, n, acc: fx.Node | None = None) -> fx.Node:
    args = (c.env[n.src], _gates(c, n.routing))
    if isinstance(n, nodes.GroupedMix):
        idx = routing_field(c, n.routing, Routing, "index", f"{n.routing}_index")
        return c.call(ops.grouped_mix, args + (idx, c.expr(n.a), c.expr(n.b), n.scale), n.id,
                      {**c.kernels, "cache": c.pack_cache, "name": n.id, "acc": acc})
    return c.call(ops.pool_mix_loop, args + (c.expr(n.a), c.expr(n.b), n.scale), n.id)


EMIT.add(lambda c, n: c.call(ops_core.core_experts_loop, (c.env[n.src], _gates(c, n.routing), c.expr(n.cores),
                                                         c.expr(n.b), n.scale), n.id), nodes.CoreExperts)
EMIT.add(lambda c, n: c.call(ops_core.core_merge, (c.env[n.src], _gates(c, n.routing), c.expr(n.cores)), n.id),
         nodes.CoreMerge)
EMIT.add(lambda c, n: c.call(ops.block_gate, (c.env[n.src], _gates(c, n.routing), n.rank, n.scale), n.id),
         nodes.BlockGate)
EMIT.add(lambda c, n: c.call(ops.outer_gate, (c.env[n.src], _gates(c, n.routing), n.scale), n.id), nodes.OuterGate)
EMIT.add(lambda c, n: c.call(ops.gate_bias, (_gates(c, n.routing), c.expr(n.bias), n.scale), n.id), nodes.GateBias)


@EMIT.register(nodes.TreePathGates)
def _path_gates(c: _Ctx, n: nodes.TreePathGates) -> fx.Node:
    index = routing_field(c, n.routing, TreeRouting, "indices", f"{n.routing}_index")
    weights = routing_field(c, n.routing, TreeRouting, "weights", f"{n.routing}_weights")
    return c.call(ops.tree_path_gates, (index, weights, n.level, c.ir.routing(n.id).experts), n.id)


EMIT.add(emit_tree_route, nodes.TreeRoute)
EMIT.add(emit_tree, nodes.TreeMix, nodes.TreePropagate)


@EMIT.register(nodes.AuxLoss)
def _aux(c: _Ctx, n: nodes.AuxLoss) -> fx.Node:
    if isinstance(c.ir.type(n.routing), TreeRoutingType):
        return emit_tree_aux(c, n)
    if n.kind == "tsallis_entropy":
        probs = routing_field(c, n.routing, Routing, "probs", f"{n.id}_probs")
        return c.call(ops_top_p.tsallis_entropy_loss, (probs, n.q, n.weight, c.mask, c.training, c.stat_group), n.id,
                      c.eval_aux)
    if n.kind == "soft_lb":
        probs = routing_field(c, n.routing, Routing, "probs", f"{n.id}_probs")
        return c.call(ops_top_p.soft_lb, (_gates(c, n.routing), probs, n.weight, c.mask, c.training, c.stat_group),
                      n.id, c.eval_aux)
    if n.kind == "switch_lb":
        gates = _gates(c, n.routing)
        probs = routing_field(c, n.routing, Routing, "probs", f"{n.id}_probs")
        index = routing_field(c, n.routing, Routing, "index", f"{n.id}_index")
        return c.call(ops.switch_lb, (gates, probs, index, n.weight, c.mask, c.training, c.stat_group), n.id,
                      c.eval_aux)
    if n.kind == "cv2_importance_load":
        return c.call(ops.cv2_importance_load, (_gates(c, n.routing), n.weight, c.mask, c.training, c.stat_group),
                      n.id, c.eval_aux)
    probs = routing_field(c, n.routing, Routing, "probs", f"{n.id}_probs")
    if n.kind == "rsl":
        return c.call(ops_mixer.rsl_loss, (probs, n.top_k, n.weight, n.entropy, c.mask, c.training, c.stat_group),
                      n.id, c.eval_aux)
    if n.kind == "task_routing":
        return c.call(ops_task.task_routing_loss, (probs, c.samples, n.weight, n.temperature, c.mask, c.training,
                                                   c.stat_group, f"aux loss {n.origin or n.id}"), n.id, c.eval_aux)
    return c.call(ops.localized_balance, (probs, c.samples, n.weight, n.delta, n.groups, c.mask, c.training,
                                          c.stat_group), n.id, c.eval_aux)


EMIT.add(lower_block.emit_expert_block, nodes.ExpertFFN, nodes.ExpertHidden)
EMIT.add(lower_block.emit_expert_sum, nodes.ExpertSum)
EMIT.add(lower_block.emit_expert_lora, nodes.ExpertLoRA)


class _Root(nn.Module):
    """What the generated code reads through ``get_attr``: the stored tensors, the
    selection-count buffers and the noise generator."""

    def __init__(self, store: nn.Module, graph: Graph, policy: KernelPolicy):
        super().__init__()
        self.kernel_policy = policy
        self.pack_cache = PackCache()
        self.eval_aux = False
        for name, t in list(store.named_parameters(recurse=False)) + list(store.named_buffers(recurse=False)):
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)
        for n in graph.nodes:
            if isinstance(n, nodes.Route) and n.gate.balances:
                gate = n.gate
                device = getattr(store, gate.balance.name).device
                counts = torch.zeros(gate.balance.shape, dtype=torch.float32, device=device)
                self.register_buffer(counts_name(gate.balance.name), counts, persistent=False)
        self.noise_generator = None
        self.stat_group = WORLD
        self.xlora_scalings = None


def _keep_unread_tensors(gm: fx.GraphModule, root: nn.Module, graph: Graph) -> None:
    """Every declared tensor stays on the module, read by the code or not (a folded router, a
    factor a sibling group reads): state dicts and checkpoints do not depend on the passes."""
    for decl in graph.params:
        if hasattr(gm, decl.name):
            continue
        t = getattr(root, decl.name)
        if isinstance(t, nn.Parameter):
            gm.register_parameter(decl.name, t)
        else:
            gm.register_buffer(decl.name, t)


def lower(graph: Graph, store: nn.Module, groups: Mapping[str, SiblingGroup] | None = None,
          policy: KernelPolicy | None = None, *, device: torch.device | str | None = None,
          plain: Graph | None = None) -> fx.GraphModule:
    """Emit ``graph`` as a GraphModule that reads its tensors from ``store``.

    The module's inputs are ``x (T, d_in)``, the optional per-token ``samples``, the frozen
    tensors of block graphs, ``acc``: the frozen layer's output, and ``mask``: which tokens are
    real (``(T,)`` bool, ``False`` on padding). Without ``acc`` it returns
    ``(Δy (T, d_out), aux, routes)``; with it, ``acc + Δy`` in ``acc``'s shape, accumulated in
    place into ``acc`` when the last node is an unbiased linear. With ``mask`` the aux losses and
    the balancing routers' selection counts count the real tokens only (``ops.py``); ``Δy`` and
    the routing are the same with and without it.

    Args:
        groups: runtime sibling groups by name; the module joins the group its
            :class:`SiblingLinear` names (if that group is given).
        policy: which kernels the module runs (default: ``KernelPolicy.from_env()``, read now);
            kept as its constant attribute ``kernel_policy``, with the CPU kernel's build
            outcome when it was built here (routed FFN blocks for a CPU).
        device: the device the module will run on, when it is not the store's; decides only
            whether the CPU kernel is built.
        plain: the site's IR before the passes (``graph`` when not given); when it is one routed
            LoRA pool, the module gets its decode form ``decode_form`` (``lower_decode.py``),
            else ``decode_form`` is ``None``.
    """
    form = pool_decode_form(graph if plain is None else plain)
    policy = with_cpu_build(graph, store, KernelPolicy.from_env() if policy is None else policy, device, form)
    c = _Ctx(graph, groups or {}, policy)
    last = graph.node(graph.output)
    into = isinstance(last, nodes.Linear) and (last.bias is None or last.scale == 1.0)
    pool_into = isinstance(last, nodes.GroupedMix)  # the grouped mix adds into the frozen output itself
    for n in graph.nodes:
        if n.id in c.fused:  # already emitted as part of a fused group (lower_tree)
            c.env[n.id] = c.fused[n.id]
            into = into and n is not last
            if not isinstance(n, nodes.GroupedMix):  # a fused grouped mix that is last added into acc
                pool_into = pool_into and n is not last
            continue
        try:
            emit = EMIT[n]
        except MissingRuleError as e:
            raise LoweringError(f"node %{n.id} of {graph.label}: {e}") from e
        if n is last and into:  # the last GEMM accumulates into the frozen output
            args = (c.acc, c.env[n.src], c.expr(n.weight), c.opt(n.bias), n.scale)
            c.env[n.id] = c.call(ops_linear.linear_into, args, n.id)
        elif n is last and pool_into:
            c.env[n.id] = _pool(c, n, c.acc)
        else:
            c.env[n.id] = emit(c, n)
    if not into and not pool_into:
        c.env[graph.output] = c.call(ops_linear.add_into, (c.acc, c.env[graph.output]), "output")
    aux = [c.env[a] for a in graph.aux]
    total = None if not aux else (aux[0] if len(aux) == 1 else c.call(ops.add_aux, tuple(aux), "aux"))
    routes = {n.id: c.env[n.id] for n in graph.nodes if isinstance(n, nodes.RouterNode)}
    c.g.output((c.env[graph.output], total, routes))
    root = _Root(store, graph, policy)
    joined = [n for n in graph.nodes if isinstance(n, nodes.SiblingLinear) and n.group in c.groups]
    root.sibling_group = c.groups[joined[0].group] if joined else None
    gm = fx.GraphModule(root, c.g, class_name="MoleforgeSite")
    gm.noise_generator = None
    gm.stat_group = WORLD
    gm.kernel_policy = policy
    gm.pack_cache = root.pack_cache
    gm.eval_aux = False
    gm.sibling_group = root.sibling_group
    gm.xlora_scalings = None
    gm.decode_form = form
    _keep_unread_tensors(gm, root, graph)
    for n in joined:
        c.groups[n.group].join(gm, n.weight, n.bias, n.start, n.stop)
    return gm


# ---- input dropout, capacity, z-loss, ragged pools, DoRA (basics_nodes) ---------------------

EMIT.add(lower_basics.emit_dropout, nodes.Dropout)
EMIT.add(lower_basics.emit_capacity, nodes.CapacityLimit)
EMIT.add(lower_basics.emit_z_loss, nodes.ZLoss)
EMIT.add(lower_basics.emit_ragged, nodes.RaggedMix)
EMIT.add(lower_basics.emit_magnitude, nodes.Magnitude)

# ---- X-LoRA (xlora_nodes): the site's scalings are its attribute ``xlora_scalings`` for the call -----

EMIT.add(lambda c, n: c.call(ops_xlora.site_scalings, (c.g.get_attr("xlora_scalings"), c.env[n.src], n.experts,
                                                        f"router {n.origin or n.id}"), n.id), nodes.LayerScalings)
ROUTE.add(lambda c, n: c.call(ops_xlora.route_xlora, (c.env[n.src], n.gate.top_k, n.gate.softmax_topk,
                                                      n.gate.weight), n.id), nodes.XLoRAScale)

# ---- EPT: Kronecker experts, task embeddings, frequency compensation, contrastive loss ---------

EMIT.add(lower_kronecker.emit_kronecker_mix, nodes.KroneckerMix)
EMIT.add(lower_kronecker.emit_task_embed, nodes.TaskEmbed)
EMIT.add(lower_kronecker.emit_task_scale, nodes.TaskScale)
EMIT.add(lower_kronecker.emit_task_contrastive, nodes.TaskContrastive)
EMIT.add(lower_dora.emit_pool_magnitude, nodes.PoolMagnitude)  # DoRA experts
EMIT.add(lambda c, n: c.call(ops_preserve.preserve_loss, (tuple(c.expr(a) for a, _ in n.pairs),
                                                          tuple(c.expr(s) for _, s in n.pairs), n.weight, c.training),
                             n.id, c.eval_aux), nodes.Preserve)  # LoRA-Mixer's L_preserve
