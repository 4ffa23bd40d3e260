"""Deterministic text form of a graph: one node per line, for goldens and error messages.

    graph site (d_in=16, d_out=24)
      %x = input 16
      %logits = linear %x W=router_w b=- -> 8
      ...
      return %delta ; aux %lb

One rule per node kind (:data:`LINE`) and per gate kind (:data:`GATE`).
"""

from __future__ import annotations

from typing import Callable

from . import nodes
from .graph import Graph
from .nodes import ExpertLinear, Node
from .params import format_expr
from .rules import Rules
from .types import ValueType

__all__ = ["print_graph", "format_node", "LINE", "GATE"]

LINE: Rules[Callable[..., str]] = Rules("the printer", nodes.NODE_KINDS)
"""Node kind -> ``(node, its result type) -> the text after "%id = "``."""

GATE: Rules[Callable[..., str]] = Rules("the printer's gates", nodes.GATE_KINDS)
"""Gate kind -> ``gate -> text``."""


def format_node(n: Node, t: ValueType) -> str:
    """One line for one node; ``t`` is its result type (``graph.type(n.id)``)."""
    return f"%{n.id} = " + LINE[n](n, t)


def print_graph(graph: Graph) -> str:
    """The whole graph as text, parameters first."""
    lines = [f"graph {graph.label} (d_in={graph.d_in}, d_out={graph.d_out})"]
    for p in graph.params:
        flags = "trainable" if p.trainable else ("buffer" if p.buffer else "frozen")
        lines.append(f"  param {p.name} {tuple(p.shape)} init={p.init} {flags}")
    for p in graph.frozen:
        lines.append(f"  frozen {p.name} {tuple(p.shape)}")
    for n in graph.nodes:
        lines.append("  " + format_node(n, graph.type(n.id)))
    aux = " ; aux " + " ".join(f"%{a}" for a in graph.aux) if graph.aux else ""
    lines.append(f"  return %{graph.output}{aux}")
    return "\n".join(lines)


# ---- gates ------------------------------------------------------------------------------

GATE.add(lambda g: f"softmax_topk(k={g.k}, renorm={g.renormalize}, tau={g.temperature:g})", nodes.SoftmaxTopK)
GATE.add(lambda g: f"dense_softmax(tau={g.temperature:g})", nodes.DenseSoftmax)
GATE.add(lambda g: f"sigmoid_topk(k={g.k}, bias={g.balance.name})", nodes.SigmoidTopK)
GATE.add(lambda g: f"abs_topk(k={g.k}, bias={g.balance.name})", nodes.AbsTopK)
GATE.add(lambda g: f"static(w={g.weights.name})", nodes.StaticGate)
GATE.add(lambda g: f"top_p_tsallis(p={g.top_p:g}, k={g.k}, q={g.q:g}, threshold={g.threshold:g})",
         nodes.TopPTsallis)
GATE.add(lambda g: f"self_activated(k={g.k}, tau={g.temperature:g}, threshold={g.threshold:g})", nodes.SelfActivated)
GATE.add(lambda g: f"dense_train_topk(k={g.infer_k}, renorm={g.renormalize}, tau={g.temperature:g})",
         nodes.DenseTrainTopK)
GATE.add(lambda g: f"xlora(top_k={g.top_k}, softmax_topk={g.softmax_topk}, weight={g.weight:g})", nodes.XLoRAScale)


# ---- nodes ------------------------------------------------------------------------------

def _scale(n) -> str:
    return f" scale={n.scale:g}" if n.scale != 1.0 else ""


@LINE.register(nodes.Input)
def _input(n, t) -> str:
    return f"input {n.width}"


@LINE.register(nodes.Linear)
def _linear(n, t) -> str:
    return f"linear %{n.src} W={format_expr(n.weight)} b={format_expr(n.bias)}{_scale(n)} -> {t.width}"


@LINE.register(nodes.SiblingLinear)
def _sibling(n, t) -> str:
    return (f"sibling_linear %{n.src} W={format_expr(n.weight)} b={format_expr(n.bias)} "
            f"group={n.group} [{n.start}:{n.stop}] -> {t.width}")


LINE.add(lambda n, t: f"columns %{n.src} [{n.start}:{n.stop}]", nodes.Columns)
LINE.add(lambda n, t: "add " + " ".join(f"%{s}" for s in n.srcs), nodes.Add)
LINE.add(lambda n, t: f"jitter %{n.src} eps={n.eps:g}", nodes.Jitter)
LINE.add(lambda n, t: f"route %{n.src} {GATE[n.gate](n.gate)} E={n.experts}", nodes.Route)
LINE.add(lambda n, t: f"block_gate %{n.src} by %{n.routing} rank={n.rank} scale={n.scale:g}", nodes.BlockGate)
LINE.add(lambda n, t: f"outer_gate %{n.src} by %{n.routing} scale={n.scale:g} -> {t.width}", nodes.OuterGate)
LINE.add(lambda n, t: f"gate_bias by %{n.routing} b={format_expr(n.bias)}{_scale(n)} -> {t.width}", nodes.GateBias)
LINE.add(lambda n, t: f"tree_path_gates %{n.routing} level={n.level} E={t.experts}", nodes.TreePathGates)
LINE.add(lambda n, t: f"expert_sum %{n.src} by %{n.routing} -> {t.width}", nodes.ExpertSum)


def _mix(kind: str) -> Callable[..., str]:
    def line(n, t) -> str:
        return (f"{kind} %{n.src} by %{n.routing} A={format_expr(n.a)} "
                f"B={format_expr(n.b)} scale={n.scale:g} -> {t.width}")
    return line


LINE.add(_mix("pool_mix"), nodes.PoolMix)
LINE.add(_mix("grouped_mix"), nodes.GroupedMix)
LINE.add(lambda n, t: (f"expert_lora %{n.src} by %{n.routing} A={format_expr(n.a)} B={format_expr(n.b)} "
                       f"scale={n.scale:g}{_block_dropout(n)} -> {t.width}"), nodes.ExpertLoRA)
LINE.add(lambda n, t: (f"core_experts %{n.src} by %{n.routing} M={format_expr(n.cores)} B={format_expr(n.b)} "
                       f"scale={n.scale:g} -> {t.width}"), nodes.CoreExperts)
LINE.add(lambda n, t: f"core_merge %{n.src} by %{n.routing} M={format_expr(n.cores)} -> {t.width}", nodes.CoreMerge)


@LINE.register(nodes.TreeRoute)
def _tree_route(n, t) -> str:
    lv = ", ".join(f"{g.experts}/{g.fanout}" for g in n.levels)
    return (f"tree_route %{n.src} gate={n.gate} levels=[{lv}] "
            f"conventions={n.conventions} query_act={n.query_activation} tau={n.temperature:g}")


def _tree(kind: str) -> Callable[..., str]:
    def line(n, t) -> str:
        lv = ", ".join(f"{p.b.shape[0]}x{p.b.shape[2]}->{p.b.shape[1]} c={p.scale:g}" for p in n.levels)
        return f"{kind} %{n.src} by %{n.routing} act={n.activation} levels=[{lv}] -> {t.width}"
    return line


LINE.add(_tree("tree_mix"), nodes.TreeMix)
LINE.add(_tree("tree_propagate"), nodes.TreePropagate)


@LINE.register(nodes.TaskScores)
def _task_scores(n, t) -> str:
    base = f"%{n.src} + " if n.token_scores else f"(T of %{n.src}) "
    table = f"{n.table.name}[task]" if n.table is not None else "onehot(task)"
    return f"task_scores {base}{table} tasks={n.tasks} -> {n.experts}"


LINE.add(lambda n, t: f"xlora_scalings (T of %{n.src}) -> {n.experts}", nodes.LayerScalings)


@LINE.register(nodes.AuxLoss)
def _aux(n, t) -> str:
    extra = f" delta={n.delta:g} groups={n.groups}" if n.kind == "localized_balance" else ""
    extra = f" q={n.q:g}" if n.kind == "tsallis_entropy" else extra
    extra += f" temperature={n.temperature:g}" if n.kind == "task_routing" else ""
    extra += f" entropy={n.entropy:g} top_k={n.top_k}" if n.kind == "rsl" else ""
    return f"aux_loss {n.kind} %{n.routing} weight={n.weight:g}{extra}"


def _expert_linear(role: str, lin: ExpertLinear | None, base: str | None) -> str:
    if lin is None:
        return ""
    frozen = f"%{base}" if base is not None else f"W={format_expr(lin.weight)} b={format_expr(lin.bias)}"
    lora = "" if lin.a is None else f" + A={format_expr(lin.a)} B={format_expr(lin.b)} scale={lin.scale:g}"
    dora = "" if lin.magnitude is None else f" magnitude={format_expr(lin.magnitude)}"
    return f" {role}=[{frozen}{lora}{dora}]"


def _expert_block(kind: str, down: bool) -> Callable[..., str]:
    def line(n, t) -> str:
        parts = _expert_linear("gate", n.gate, n.gate_base) + _expert_linear("up", n.up, n.up_base)
        if down:
            parts += _expert_linear("down", n.down, None)
        return f"{kind} %{n.src} by %{n.routing} act={n.activation}{parts}{_block_dropout(n)} -> {t.width}"
    return line


def _block_dropout(n) -> str:
    return f" dropout={n.dropout:g}" if n.dropout else ""


LINE.add(_expert_block("expert_ffn", True), nodes.ExpertFFN)
LINE.add(_expert_block("expert_hidden", False), nodes.ExpertHidden)


# ---- input dropout, capacity, z-loss, ragged pools (basics_nodes) -------------------------

LINE.add(lambda n, t: f"dropout %{n.src} p={n.p:g}", nodes.Dropout)
LINE.add(lambda n, t: f"capacity %{n.routing} factor={n.factor:g} E={t.experts}", nodes.CapacityLimit)
LINE.add(lambda n, t: f"z_loss %{n.src} weight={n.weight:g}", nodes.ZLoss)


@LINE.register(nodes.RaggedMix)
def _ragged(n, t) -> str:
    scales = ",".join(f"{s:g}" for s in n.scales)
    form = " grouped" if n.grouped else ""
    return (f"ragged_mix{form} %{n.src} by %{n.routing} A={n.a.name} B={n.b.name} "
            f"ranks={list(n.ranks)} scales=[{scales}] -> {t.width}")
LINE.add(lambda n, t: (f"magnitude %{n.src} %{n.lora} W={n.weight.name} A={n.a.name} B={n.b.name} "
                       f"scale={n.scale:g} m={n.magnitude.name} -> {t.width}"), nodes.Magnitude)


# ---- EPT: Kronecker experts, task embeddings, frequency compensation, contrastive loss ---------

LINE.add(lambda n, t: (f"kronecker_mix %{n.src} by %{n.routing} A={n.a.name} B={n.b.name} "
                       f"K=[{','.join(k.name for k in n.kernels)}] s={list(n.sizes())} scale={n.scale:g} "
                       f"-> {t.width}"), nodes.KroneckerMix)
LINE.add(lambda n, t: f"task_embed %{n.src} + {n.table.name}[task]", nodes.TaskEmbed)
LINE.add(lambda n, t: f"task_scale %{n.src} by [{','.join(f'{c:g}' for c in n.factors)}][task]", nodes.TaskScale)
LINE.add(lambda n, t: (f"task_contrastive %{n.src} vs {n.table.name} weight={n.weight:g} "
                       f"temperature={n.temperature:g}"), nodes.TaskContrastive)
LINE.add(lambda n, t: (f"pool_magnitude %{n.src} by %{n.routing} W={n.weight.name} A={n.a.name} B={n.b.name} "
                       f"scale={n.scale:g} m={n.magnitude.name} -> {t.width}"), nodes.PoolMagnitude)
LINE.add(lambda n, t: "preserve " + ", ".join(f"{c.name}~{s.name}" for c, s in n.pairs) + f" weight={n.weight:g}",
         nodes.Preserve)
