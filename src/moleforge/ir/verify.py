"""``verify(graph)``: a graph is valid when every id is defined once before it is used,
every input has the type its consumer expects, every parameter expression names a
declared tensor of the right shape and fits the widths it meets, the output is a tensor
of width ``d_out``, aux ids name aux losses, and every node is live. All violations are
collected and raised once, with the printed graph."""

from __future__ import annotations

from typing import Callable

from ..errors import IRVerificationError
from . import nodes, verify_basics, verify_dora, verify_kronecker
from .graph import Graph
from .nodes import ExpertHidden, ExpertLinear, Input
from .params import ParamExpr, ParamRef, expr_refs, expr_shape
from .rules import Rules
from .types import RoutingType, TensorType, TreeRoutingType, ValueType

__all__ = ["verify", "RULES", "GATE_RULES"]

RULES: Rules[Callable[[Graph, nodes.Node], list[str]]] = Rules("the verifier", nodes.NODE_KINDS)
"""Node kind -> ``(graph, node) -> problems``."""

GATE_RULES: Rules[Callable[[Graph, nodes.Route], list[str]]] = Rules("the verifier's gates", nodes.GATE_KINDS)
"""Gate kind -> ``(graph, route) -> problems`` of a :class:`~moleforge.ir.nodes.Route` with that gate."""


def verify(graph: Graph) -> Graph:
    """Check every rule; return the graph unchanged, or raise :class:`IRVerificationError`."""
    problems = _structure(graph)
    if not problems:
        for n in graph.nodes:
            problems += [f"%{n.id}: {p}" for p in RULES[n](graph, n)]
        problems += _outputs(graph)
    if problems:
        from .printer import print_graph
        try:
            text = print_graph(graph)
        except Exception:  # noqa: BLE001 - a broken graph may not print; the problems still matter
            text = "\n".join(repr(n) for n in graph.nodes)
        raise IRVerificationError(
            f"graph {graph.label!r} failed verification:\n  - " + "\n  - ".join(problems) + f"\n{text}")
    return graph


def _structure(g: Graph) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for n in g.nodes:
        if n.id in seen:
            out.append(f"%{n.id} is defined twice")
        for i in n.inputs():
            if i not in seen:
                out.append(f"%{n.id} reads %{i} before it is defined; nodes must be topologically ordered")
        seen.add(n.id)
    inputs = [n for n in g.nodes if isinstance(n, Input)]
    if len(inputs) != 1:
        out.append(f"expected exactly one input node, found {len(inputs)}")
    elif inputs[0].width != g.d_in:
        out.append(f"input width {inputs[0].width} != d_in {g.d_in}")
    names = [p.name for p in (*g.params, *g.frozen)]
    if len(set(names)) != len(names):
        out.append(f"parameter and frozen input names are not unique: {names}")
    return out


def _type(g: Graph, nid: str) -> ValueType | None:
    """The type of ``nid``, or ``None`` when it cannot be inferred (that node's own rules say why)."""
    try:
        return g.type(nid)
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return None


def _expr(g: Graph, e: ParamExpr, what: str) -> list[str]:
    out = []
    for ref in expr_refs(e):
        decl = g.all_decls.get(ref.name)
        if decl is None:
            out.append(f"{what} reads undeclared parameter {ref.name!r}")
        elif tuple(decl.shape) != tuple(ref.shape):
            out.append(f"{what} expects {ref.name} of shape {ref.shape}, declared {decl.shape}")
    if not out:
        try:
            expr_shape(e)
        except (ValueError, TypeError, IndexError) as exc:
            out.append(f"{what}: malformed expression ({exc})")
    return out


def _need(g: Graph, nid: str, kind: type, what: str) -> list[str]:
    t = _type(g, nid)
    if t is None:
        return [f"%{nid} is not a {what}: its type cannot be inferred"]
    return [] if isinstance(t, kind) else [f"%{nid} is not a {what}; it yields a {t}"]


def _need_tensor(g: Graph, nid: str, what: str) -> list[str]:
    t = _type(g, nid)
    return [] if isinstance(t, TensorType) else [f"{what} %{nid} is not a tensor"]


def _need_route(g: Graph, nid: str) -> list[str]:
    return _need(g, nid, RoutingType, "Route (a flat routing)")


def _need_tree(g: Graph, nid: str) -> list[str]:
    return _need(g, nid, TreeRoutingType, "TreeRoute (a tree routing)")


@RULES.register(nodes.Input)
def _input(g: Graph, n) -> list[str]:
    return []


@RULES.register(nodes.Linear, nodes.SiblingLinear)
def _linear(g: Graph, n) -> list[str]:
    w = g.width
    p = _need_tensor(g, n.src, "source") + _expr(g, n.weight, "weight")
    if n.bias is not None:
        p += _expr(g, n.bias, "bias")
    if p:
        return p
    ws = expr_shape(n.weight)
    if len(ws) != 2 or ws[1] != w(n.src):
        p.append(f"weight shape {ws} does not read width {w(n.src)}")
    if n.bias is not None and expr_shape(n.bias) != (ws[0],):
        p.append(f"bias shape {expr_shape(n.bias)} != ({ws[0]},)")
    if isinstance(n, nodes.SiblingLinear) and n.stop - n.start != ws[0]:
        p.append(f"group columns [{n.start}:{n.stop}] do not hold the {ws[0]} outputs of the weight")
    return p


@RULES.register(nodes.Columns)
def _columns(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "source")
    if not p and not (0 <= n.start < n.stop <= g.width(n.src)):
        p.append(f"columns [{n.start}:{n.stop}] outside width {g.width(n.src)}")
    return p


@RULES.register(nodes.Add)
def _add(g: Graph, n) -> list[str]:
    p = [x for s in n.srcs for x in _need_tensor(g, s, "term")]
    if not p and len({g.width(s) for s in n.srcs}) != 1:
        p.append(f"terms have different widths {[g.width(s) for s in n.srcs]}")
    return p


RULES.add(lambda g, n: _need_tensor(g, n.src, "source"), nodes.Jitter)


@RULES.register(nodes.TaskScores)
def _task_scores(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "token scores")
    if n.table is not None:
        p += _expr(g, n.table, "task table")
        if not p and expr_shape(n.table) != (n.tasks, n.experts):
            p.append(f"task table has shape {expr_shape(n.table)}, expected (tasks, experts) = {(n.tasks, n.experts)}")
    elif n.token_scores or n.tasks > n.experts:
        p.append(f"hard task routing (no table) sends task t to expert t: it needs tasks <= experts and no token "
                 f"scores (tasks = {n.tasks}, experts = {n.experts}, token_scores = {n.token_scores})")
    if not p and n.token_scores and g.width(n.src) != n.experts:
        p.append(f"token scores %{n.src} have width {g.width(n.src)}, the router has {n.experts} experts")
    return p
RULES.add(lambda g, n: GATE_RULES[n.gate](g, n), nodes.Route)
RULES.add(lambda g, n: _need_tensor(g, n.src, "token source"), nodes.LayerScalings)


@GATE_RULES.register(nodes.XLoRAScale)
def _xlora_gate(g: Graph, n) -> list[str]:
    """Scalings ``(T, E)`` from the site's X-LoRA input; ``1 <= top_k <= E``."""
    if not isinstance(g.node(n.src), nodes.LayerScalings):
        return [f"an xlora gate reads the site's X-LoRA scalings; %{n.src} is a {type(g.node(n.src)).__name__}"]
    p = [] if g.width(n.src) == n.experts else [f"scalings have width {g.width(n.src)}, router has {n.experts} experts"]
    if n.gate.top_k is not None and not (1 <= n.gate.top_k <= n.experts):
        p.append(f"top_k = {n.gate.top_k} outside [1, {n.experts}]")
    return p


@GATE_RULES.register(nodes.StaticGate)
def _static_gate(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "token source") + _expr(g, n.gate.weights, "static weights")
    if not p and expr_shape(n.gate.weights) != (n.experts,):
        p.append(f"static weights have shape {expr_shape(n.gate.weights)}, router has {n.experts} experts")
    return p


@GATE_RULES.register(nodes.SoftmaxTopK, nodes.DenseSoftmax, nodes.SigmoidTopK, nodes.AbsTopK, nodes.SelfActivated,
                     nodes.DenseTrainTopK)
def _scored_gate(g: Graph, n) -> list[str]:
    """A gate on scores ``src (T, E)``: ``1 <= k <= E``, and its balancing bias declared."""
    p = _need_tensor(g, n.src, "scores")
    if not p and g.width(n.src) != n.experts:
        p.append(f"scores have width {g.width(n.src)}, router has {n.experts} experts")
    k = n.gate.in_mode(False).k
    if k is not None and not (1 <= k <= n.experts):
        p.append(f"k = {k} outside 1..{n.experts}")
    if n.gate.balances:
        p += _expr(g, n.gate.balance, "balance bias")
    return p


@GATE_RULES.register(nodes.TopPTsallis)
def _top_p_gate(g: Graph, n) -> list[str]:
    """A scored gate whose ``top_p`` lies in (0, 1], threshold in [0, 1] and index q > 0."""
    p = _scored_gate(g, n)
    gate = n.gate
    if not (0 < gate.top_p <= 1 and 0 <= gate.threshold <= 1 and gate.q > 0):
        p.append(f"top_p gate with p = {gate.top_p}, threshold = {gate.threshold}, q = {gate.q}: "
                 "needs 0 < p <= 1, 0 <= threshold <= 1 and q > 0")
    return p


@RULES.register(nodes.BlockGate)
def _block_gate(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "source") + _need_route(g, n.routing)
    if not p and g.width(n.src) != g.routing(n.routing).experts * n.rank:
        p.append(f"width {g.width(n.src)} != experts {g.routing(n.routing).experts} x rank {n.rank}")
    return p


RULES.add(lambda g, n: _need_tensor(g, n.src, "source") + _need_route(g, n.routing), nodes.OuterGate)


@RULES.register(nodes.GateBias)
def _gate_bias(g: Graph, n) -> list[str]:
    p = _need_route(g, n.routing) + _expr(g, n.bias, "bias")
    if not p:
        shape, E = expr_shape(n.bias), g.routing(n.routing).experts
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != E):
            p.append(f"bias shape {shape} is neither ({E}, d) nor (d,)")
    return p


@RULES.register(nodes.TreePathGates)
def _path_gates(g: Graph, n) -> list[str]:
    p = _need_tree(g, n.routing)
    if not p and not 0 <= n.level < g.tree_routing(n.routing).pools:
        p.append(f"level {n.level} outside the router's {g.tree_routing(n.routing).pools} pools")
    return p


@RULES.register(nodes.TreeRoute)
def _tree_route(g: Graph, n) -> list[str]:
    return _need_tensor(g, n.src, "source") + [
        x for lv in n.levels for r in (lv.keys, lv.w1, lv.b1, lv.w2, lv.b2)
        for x in _expr(g, r, f"router of pool with {lv.experts} experts")]


@RULES.register(nodes.ExpertSum)
def _expert_sum(g: Graph, n) -> list[str]:
    return _expert_value_rules(g, n)


@RULES.register(nodes.ExpertLoRA)
def _expert_lora(g: Graph, n) -> list[str]:
    p = _expert_value_rules(g, n) + _expr(g, n.a, "A") + _expr(g, n.b, "B") + _block_dropout(n)
    if not p:
        p = _expert_factor_rules(g, n.a.shape, n.b.shape, g.routing(n.routing).experts,
                                 g.per_expert(n.src).width, "A/B")
    return p


@RULES.register(nodes.AuxLoss)
def _aux(g: Graph, n) -> list[str]:
    t = _type(g, n.routing)
    if not isinstance(t, (RoutingType, TreeRoutingType)):
        return [f"%{n.routing} is not a Route/TreeRoute (a routing); it yields a {t}"]
    route = g.node(n.routing)
    if n.kind == "switch_lb" and isinstance(route, nodes.Route) and not isinstance(route.gate, nodes.SoftmaxTopK):
        return ["switch_lb needs a softmax top-k router"]
    if n.kind in ("tsallis_entropy", "soft_lb") and not isinstance(t, RoutingType):
        return [f"{n.kind} needs a flat routing, got a {t}"]
    if n.kind == "rsl" and not (isinstance(route, nodes.Route) and
                                 isinstance(route.gate, (nodes.SoftmaxTopK, nodes.DenseSoftmax, nodes.DenseTrainTopK))):
        return ["rsl needs a flat softmax router"]
    if n.kind == "task_routing" and not (isinstance(route, nodes.Route) and
                                          isinstance(route.gate, (nodes.SoftmaxTopK, nodes.DenseSoftmax,
                                                                  nodes.DenseTrainTopK))):
        return ["task_routing needs a flat softmax router (top-k or dense)"]
    return []


@RULES.register(nodes.PoolMix, nodes.GroupedMix)
def _pool_rules(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "source") + _need_route(g, n.routing) + _expr(g, n.a, "A") + _expr(g, n.b, "B")
    if p:
        return p
    a, b = expr_shape(n.a), expr_shape(n.b)
    E = g.routing(n.routing).experts
    if len(a) != 3 or len(b) != 3:
        return [f"A {a} and B {b} must be stacked (E, r, d_in) / (E, d_out, r)"]
    if a[0] not in (1, E) or b[0] not in (1, E):
        p.append(f"A has {a[0]} and B {b[0]} experts; router has {E} (1 means shared)")
    if a[2] != g.width(n.src):
        p.append(f"A reads width {a[2]}, source has {g.width(n.src)}")
    if a[1] != b[2]:
        p.append(f"rank of A ({a[1]}) != rank of B ({b[2]})")
    if isinstance(n, nodes.GroupedMix) and not g.routing(n.routing).sparse:
        p.append("grouped_mix needs a sparse (top-k) router")
    return p


@RULES.register(nodes.CoreExperts, nodes.CoreMerge)
def _core_rules(g: Graph, n) -> list[str]:
    """Cores ``(E, r, r)`` over a core-space source of width r routed over E experts; B ``(d_out, r)``."""
    p = _need_tensor(g, n.src, "source") + _need_route(g, n.routing) + _expr(g, n.cores, "cores")
    if isinstance(n, nodes.CoreExperts):
        p += _expr(g, n.b, "B")
    if p:
        return p
    shape, E, r = expr_shape(n.cores), g.routing(n.routing).experts, g.width(n.src)
    if shape != (E, r, r):
        p.append(f"cores have shape {shape}, expected ({E}, {r}, {r}): one r x r core per expert on the width-{r} "
                 "source")
    if isinstance(n, nodes.CoreExperts) and expr_shape(n.b)[1:] != (r,):
        p.append(f"B has shape {expr_shape(n.b)}, expected (d_out, {r})")
    return p


@RULES.register(nodes.TreeMix, nodes.TreePropagate)
def _tree_rules(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "source") + _need_tree(g, n.routing)
    if p:
        return p
    route = g.tree_routing(n.routing)
    if route.pools != len(n.levels):
        return [f"router has {route.pools} pools, tree has {len(n.levels)}"]
    d_prev, total = 0, 0
    for l, lv in enumerate(n.levels):
        refs: list[ParamRef] = [r for r in (lv.a, lv.b, lv.a_bias, lv.b_bias, lv.w, lv.w_bias) if r is not None]
        for r in refs:
            p += _expr(g, r, f"pool {l}")
        s, d_next, r = lv.b.shape
        if s != route.experts[l]:
            p.append(f"pool {l} has {s} experts, its router {route.experts[l]}")
        if d_next != d_prev + s * r:
            p.append(f"pool {l} width {d_next} != d_l + s*r = {d_prev + s * r}")
        if (lv.w is None) != (l == 0):
            p.append(f"pool {l}: a level transform W exists exactly for l >= 1")
        elif lv.w is not None and lv.w.shape != (d_next, d_prev):
            p.append(f"pool {l}: W shape {lv.w.shape} != {(d_next, d_prev)}")
        total += s * r
        d_prev = d_next
    want = g.width(n.src) if isinstance(n, nodes.TreePropagate) else n.levels[0].a.shape[2]
    if isinstance(n, nodes.TreePropagate) and want != total:
        p.append(f"source width {want} != total rank {total}")
    if isinstance(n, nodes.TreeMix) and want != g.width(n.src):
        p.append(f"A reads width {want}, source has {g.width(n.src)}")
    return p


def _expert_factor_rules(g: Graph, a: tuple, b: tuple, E: int, d_in: int, what: str) -> list[str]:
    if len(a) != 3 or len(b) != 3:
        return [f"{what}: A {a} and B {b} must be stacked (E, r, d_in) / (E, d_out, r)"]
    p = []
    if a[0] != E or b[0] != E:
        p.append(f"{what}: A has {a[0]} and B {b[0]} experts; the router has {E}")
    if a[2] != d_in:
        p.append(f"{what}: A reads width {a[2]}, its input has {d_in}")
    if a[1] != b[2]:
        p.append(f"{what}: rank of A ({a[1]}) != rank of B ({b[2]})")
    return p


def _expert_linear_rules(g: Graph, lin: ExpertLinear, d_in: int, E: int, what: str) -> list[str]:
    """Frozen W/b declared frozen and fitting ``d_in``; A and B both or neither, trainable, stacked."""
    p = []
    for ref in (lin.weight, lin.bias):
        if ref is not None and ref.name not in {d.name for d in g.frozen}:
            p.append(f"{what}: {ref.name!r} must be a frozen input (declared in graph.frozen)")
    p += _expr(g, lin.weight, f"{what} weight") + (_expr(g, lin.bias, f"{what} bias") if lin.bias else [])
    if (lin.a is None) != (lin.b is None):
        p.append(f"{what}: give both expert factors A and B, or neither")
    if lin.magnitude is not None and lin.a is None:
        p.append(f"{what}: a DoRA magnitude {lin.magnitude.name!r} needs expert factors A and B; drop it or add them")
    if p:
        return p
    w = lin.weight.shape
    if len(w) != 2 or w[1] != d_in:
        p.append(f"{what}: weight {w} does not read width {d_in}")
    elif lin.bias is not None and lin.bias.shape != (w[0],):
        p.append(f"{what}: bias {lin.bias.shape} != ({w[0]},)")
    if lin.a is not None and lin.b is not None:
        p += _expr(g, lin.a, f"{what} A") + _expr(g, lin.b, f"{what} B")
        p += [] if p else _expert_factor_rules(g, lin.a.shape, lin.b.shape, E, d_in, what)
        if not p and lin.b.shape[1] != w[0]:
            p.append(f"{what}: B writes width {lin.b.shape[1]}, the frozen weight {w[0]}")
        if not p and lin.magnitude is not None:
            p += _expr(g, lin.magnitude, f"{what} magnitude")
            if not p and lin.magnitude.shape != (E, w[0]):
                p.append(f"{what}: magnitude {lin.magnitude.shape} != ({E}, {w[0]}), one per expert and output row")
    return p


@RULES.register(nodes.ExpertFFN, nodes.ExpertHidden)
def _expert_block_rules(g: Graph, n) -> list[str]:
    p = _need_tensor(g, n.src, "source") + _need_route(g, n.routing) + _block_dropout(n)
    if p:
        return p
    E, d_in = g.routing(n.routing).experts, g.width(n.src)
    p = _expert_linear_rules(g, n.up, d_in, E, "up")
    if n.gate is not None:
        p += _expert_linear_rules(g, n.gate, d_in, E, "gate")
    if p:
        return p
    d_ff = n.up.weight.shape[0]
    if n.gate is not None and n.gate.weight.shape[0] != d_ff:
        p.append(f"gate width {n.gate.weight.shape[0]} != up width {d_ff}")
    if isinstance(n, nodes.ExpertFFN):
        p += _expert_linear_rules(g, n.down, d_ff, E, "down")
    for base, lin in ((n.gate_base, n.gate), (n.up_base, n.up)):
        if base is None:
            continue
        if lin is None:
            p.append(f"%{base} is a frozen gate projection but the block has no gate")
        else:
            p += _need_tensor(g, base, "frozen projection")
            if not p and g.width(base) != d_ff:
                p.append(f"frozen projection %{base} has width {g.width(base)}, expected {d_ff}")
    return p


def _block_dropout(n) -> list[str]:
    return [] if 0.0 <= n.dropout < 1.0 else [f"dropout probability {n.dropout} outside [0, 1)"]


def _expert_value_rules(g: Graph, n) -> list[str]:
    p = _need_route(g, n.routing)
    src = g.node(n.src)
    if not isinstance(src, ExpertHidden):
        p.append(f"%{n.src} is not an expert_hidden value")
    elif src.routing != n.routing:
        p.append(f"%{n.src} is routed by %{src.routing}, this node by %{n.routing}")
    return p


def _outputs(g: Graph) -> list[str]:
    out: list[str] = []
    if g.output not in g.by_id:
        return [f"output %{g.output} is not defined"]
    if not isinstance(_type(g, g.output), TensorType):
        out.append(f"output %{g.output} is not a tensor")
    elif g.width(g.output) != g.d_out:
        out.append(f"output width {g.width(g.output)} != d_out {g.d_out}")
    for a in g.aux:
        if not isinstance(g.by_id.get(a), (nodes.AuxLoss, nodes.ZLoss, nodes.TaskContrastive, nodes.Preserve)):
            out.append(f"aux %{a} is not an aux loss")
    dead = [n.id for n in g.nodes if n.id not in g.live_ids()]
    if dead:
        out.append(f"dead nodes (nothing reads them): {', '.join('%' + d for d in dead)}")
    return out


verify_basics.register(RULES, _need_tensor, _need_route, _expr)  # dropout, capacity, z-loss, ragged pools, DoRA
verify_kronecker.register(RULES, _need_tensor, _need_route, _expr)  # EPT's nodes
verify_dora.register(RULES, _need_tensor, _need_route, _expr)  # DoRA experts


@RULES.register(nodes.Preserve)
def _preserve(g: Graph, n: nodes.Preserve) -> list[str]:
    """Each pair: a trainable tensor and a buffer of its shape that keeps its starting value."""
    p = [x for c, s in n.pairs for x in _expr(g, c, "θ") + _expr(g, s, "θ⁰")]
    if p:
        return p
    for c, s in n.pairs:
        if c.shape != s.shape:
            p.append(f"{c.name} {c.shape} and its starting value {s.name} {s.shape} differ in shape")
        if not g.all_decls[c.name].trainable or g.all_decls[s.name].trainable:
            p.append(f"{c.name} must be trainable and {s.name} a buffer")
    return p
