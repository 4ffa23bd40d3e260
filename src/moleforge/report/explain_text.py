"""Shared pieces of the explanations of ``mf.explain`` / ``handle.explain()`` and ``moleforge
inspect``: a site as explained, where a group of sites is, the terminal field layout, and the
parameters, router and Γ of a graph."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Mapping

from ..ir import (
    AbsTopK,
    DenseSoftmax,
    DenseTrainTopK,
    ExpertFFN,
    ExpertHidden,
    Graph,
    Route,
    SelfActivated,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TopPTsallis,
    TreeMix,
    TreePropagate,
    TreeRoute,
    XLoRAScale,
)
from .structure import capacity_pool_gamma, format_gamma, pool_gamma, tree_gamma_text, variable_pool_gamma

__all__ = ["ROLES", "ROUTER_WORDS", "SiteRow", "block_node", "where", "field", "field_lines", "parameters_text",
           "router_text", "gamma_text"]

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class SiteRow:
    """One adapted module as explained: its name, plain and optimised graph."""

    name: str
    plain: Graph
    final: Graph
    linears: Mapping[str, str] | None = None
    """For an FFN-block site, the model path of each linear of the block by role
    (``gate``, ``up``, ``down``); ``None`` for a linear site."""
    trace: tuple = ()
    """``(step, graph after it)`` for every pass the plan ran on the site."""


def block_node(g: Graph) -> ExpertFFN | ExpertHidden | None:
    return next((n for n in g.nodes if isinstance(n, (ExpertFFN, ExpertHidden))), None)


def where(names: list[str]) -> str:
    """``model.layers.{0,1,2,3}.self_attn.q_proj`` for names differing in one dotted part."""
    parts = [n.split(".") for n in names]
    if len(names) == 1 or len({len(p) for p in parts}) != 1:
        return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1:
        return f"{names[0]} and {len(names) - 1} more"
    i = differ[0]
    return ".".join(parts[0][:i] + ["{" + ",".join(p[i] for p in parts) + "}"] + parts[0][i + 1:])


def field(name: str, text: str) -> list[str]:
    return textwrap.wrap(text, 104, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15,
                         break_on_hyphens=False)


def field_lines(name: str, texts: list[str]) -> list[str]:
    """A field of several lines, each wrapped as :func:`field` wraps one."""
    return [line for i, text in enumerate(texts) for line in field(name if i == 0 else "", text)]


def parameters_text(g: Graph) -> str:
    trainable = {p.name: math.prod(p.shape) for p in g.params if p.trainable}
    frozen = {p.name: math.prod(p.shape) for p in g.params if not p.trainable}
    text = f"{sum(trainable.values()):,} trainable per site"
    if trainable:
        text += ": " + ", ".join(f"{k}={v:,}" for k, v in trainable.items())
    if frozen:
        text += "; buffers " + ", ".join(f"{k}={v:,}" for k, v in frozen.items())
    if g.frozen:
        text += "; frozen inputs (the model's own weights, read in place) " + \
            ", ".join(f"{p.name}={math.prod(p.shape):,}" for p in g.frozen)
    return text


ROUTER_WORDS: dict[type, str] = {
    SoftmaxTopK: "softmax top-{k}",
    SigmoidTopK: "sigmoid top-{k} (balancing bias)",
    AbsTopK: "|h| top-{k} mask (FlyLoRA)",
    DenseSoftmax: "dense softmax",
    StaticGate: "static weights (the same for every token)",
    TopPTsallis: "top-p ∪ top-{k}, Tsallis-entropy broadcast (DynMoLE)",
    SelfActivated: "self-activated |h| scores: top-{k} in training, a threshold in evaluation (MoRA-CL)",
    DenseTrainTopK: "dense softmax in training, softmax top-{k} in evaluation",
    XLoRAScale: "X-LoRA scalings of the model-scope classifier (per token, per layer)",
}
"""How :func:`router_text` names each gate of the IR (every member of ``ir.Gate``)."""


def router_text(route: Route) -> str:
    gate = route.gate
    return ROUTER_WORDS[type(gate)].format(k=gate.in_mode(False).k)


def gamma_text(g: Graph) -> str:
    """Γ of a plain graph with its formula (:mod:`moleforge.report.structure`): a tree's count
    follows its activation and where it acts."""
    tree = next((n for n in g.nodes if isinstance(n, TreeRoute)), None)
    if tree is not None:
        mix = next((n for n in g.nodes if isinstance(n, (TreeMix, TreePropagate))), None)
        activation, position = (mix.activation, mix.position) if mix is not None else ("tanh", "all")
        return tree_gamma_text([(lv.experts, lv.fanout) for lv in tree.levels], activation, position)
    route = next((n for n in g.nodes if isinstance(n, Route)), None)
    k = None if route is None else route.k
    if k is None:
        return "1 (no top-k routing)"
    if route.gate.variable:
        E = route.experts
        return f"{format_gamma(variable_pool_gamma(E, k))} = Σ_(j={k}..{E}) C({E},j) expert sets per token"
    if any(type(n).__name__ == "CapacityLimit" for n in g.nodes):
        return (f"{format_gamma(capacity_pool_gamma(route.experts, k))} = Σ_{{i<={k}}} C({route.experts},i) expert "
                "sets per token (capacity may drop any of the k)")
    return f"{format_gamma(pool_gamma(route.experts, k))} = C({route.experts},{k}) expert sets per token"
