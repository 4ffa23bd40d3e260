"""Deterministic text form of a graph: one node per line, for goldens and error messages.

    graph site (d_in=16, d_out=24)
      %x = input 16
      %logits = linear %x W=router_w b=- -> 8
      ...
      return %delta ; aux %lb
"""

from __future__ import annotations

from .graph import Graph
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
    Node,
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
from .params import format_expr

__all__ = ["print_graph", "format_node"]


def _gate(g) -> str:
    match g:
        case SoftmaxTopK(k=k, renormalize=r, temperature=t):
            return f"softmax_topk(k={k}, renorm={r}, tau={t:g})"
        case DenseSoftmax(temperature=t):
            return f"dense_softmax(tau={t:g})"
        case SigmoidTopK(k=k, balance=b):
            return f"sigmoid_topk(k={k}, bias={b.name})"
        case AbsTopK(k=k, balance=b):
            return f"abs_topk(k={k}, bias={b.name})"
        case StaticGate(weights=w):
            return f"static(w={w.name})"
    raise TypeError(g)


def _expert_linear(role: str, lin: ExpertLinear | None, base: str | None) -> str:
    if lin is None:
        return ""
    frozen = f"%{base}" if base is not None else f"W={format_expr(lin.weight)} b={format_expr(lin.bias)}"
    lora = "" if lin.a is None else f" + A={format_expr(lin.a)} B={format_expr(lin.b)} scale={lin.scale:g}"
    return f" {role}=[{frozen}{lora}]"


def _expert_block(n, width: int) -> str:
    kind = "expert_ffn" if isinstance(n, ExpertFFN) else "expert_hidden"
    parts = _expert_linear("gate", n.gate, n.gate_base) + _expert_linear("up", n.up, n.up_base)
    if isinstance(n, ExpertFFN):
        parts += _expert_linear("down", n.down, None)
    return f"%{n.id} = {kind} %{n.src} by %{n.routing} act={n.activation}{parts} -> {width}"


def format_node(n: Node, width: int) -> str:
    """One line for one node; ``width`` is its inferred output width."""
    match n:
        case Input():
            return f"%{n.id} = input {n.width}"
        case Linear():
            sc = f" scale={n.scale:g}" if n.scale != 1.0 else ""
            return f"%{n.id} = linear %{n.src} W={format_expr(n.weight)} b={format_expr(n.bias)}{sc} -> {width}"
        case Columns():
            return f"%{n.id} = columns %{n.src} [{n.start}:{n.stop}]"
        case Add():
            return f"%{n.id} = add " + " ".join(f"%{s}" for s in n.srcs)
        case Jitter():
            return f"%{n.id} = jitter %{n.src} eps={n.eps:g}"
        case Route():
            return f"%{n.id} = route %{n.src} {_gate(n.gate)} E={n.experts}"
        case PoolMix() | GroupedMix():
            kind = "pool_mix" if isinstance(n, PoolMix) else "grouped_mix"
            return (f"%{n.id} = {kind} %{n.src} by %{n.routing} A={format_expr(n.a)} "
                    f"B={format_expr(n.b)} scale={n.scale:g} -> {width}")
        case BlockGate():
            return f"%{n.id} = block_gate %{n.src} by %{n.routing} rank={n.rank} scale={n.scale:g}"
        case OuterGate():
            return f"%{n.id} = outer_gate %{n.src} by %{n.routing} scale={n.scale:g} -> {width}"
        case TreeRoute():
            lv = ", ".join(f"{g.experts}/{g.fanout}" for g in n.levels)
            return (f"%{n.id} = tree_route %{n.src} gate={n.gate} levels=[{lv}] "
                    f"conventions={n.conventions} query_act={n.query_activation} tau={n.temperature:g}")
        case TreeMix() | TreePropagate():
            kind = "tree_mix" if isinstance(n, TreeMix) else "tree_propagate"
            lv = ", ".join(f"{p.b.shape[0]}x{p.b.shape[2]}->{p.b.shape[1]} c={p.scale:g}" for p in n.levels)
            return f"%{n.id} = {kind} %{n.src} by %{n.routing} act={n.activation} levels=[{lv}] -> {width}"
        case SiblingLinear():
            return (f"%{n.id} = sibling_linear %{n.src} W={format_expr(n.weight)} b={format_expr(n.bias)} "
                    f"group={n.group} [{n.start}:{n.stop}] -> {width}")
        case GateBias():
            sc = f" scale={n.scale:g}" if n.scale != 1.0 else ""
            return f"%{n.id} = gate_bias by %{n.routing} b={format_expr(n.bias)}{sc} -> {width}"
        case TreePathGates():
            return f"%{n.id} = tree_path_gates %{n.routing} level={n.level} E={width}"
        case AuxLoss():
            extra = f" delta={n.delta:g} groups={n.groups}" if n.kind == "localized_balance" else ""
            return f"%{n.id} = aux_loss {n.kind} %{n.routing} weight={n.weight:g}{extra}"
        case ExpertFFN() | ExpertHidden():
            return _expert_block(n, width)
        case ExpertSum():
            return f"%{n.id} = expert_sum %{n.src} by %{n.routing} -> {width}"
        case ExpertLoRA():
            return (f"%{n.id} = expert_lora %{n.src} by %{n.routing} A={format_expr(n.a)} "
                    f"B={format_expr(n.b)} scale={n.scale:g} -> {width}")
    raise TypeError(f"unknown node kind {type(n).__name__}")


def print_graph(graph: Graph) -> str:
    """The whole graph as text, parameters first."""
    lines = [f"graph {graph.label} (d_in={graph.d_in}, d_out={graph.d_out})"]
    for p in graph.params:
        flags = "trainable" if p.trainable else ("buffer" if p.buffer else "frozen")
        lines.append(f"  param {p.name} {tuple(p.shape)} init={p.init} {flags}")
    for p in graph.frozen:
        lines.append(f"  frozen {p.name} {tuple(p.shape)}")
    for n in graph.nodes:
        lines.append("  " + format_node(n, graph.width(n.id)))
    aux = " ; aux " + " ".join(f"%{a}" for a in graph.aux) if graph.aux else ""
    lines.append(f"  return %{graph.output}{aux}")
    return "\n".join(lines)
