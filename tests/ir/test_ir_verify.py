"""One negative test per verifier message: each case corrupts a valid graph so that it breaks
one rule, and ``verify`` raises with that rule's message and the printed graph. A coverage test
reads every message template of ``ir/verify.py`` from its source and fails for a template that
no case produces."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass, replace
from typing import Callable

import pytest

from moleforge.compiler.build import SiteShape, build_block_graph, build_graph
from moleforge.errors import IRVerificationError
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import (
    Add,
    BlockRows,
    CapacityLimit,
    Columns,
    GateBias,
    Graph,
    GroupedMix,
    Input,
    Linear,
    ParamDecl,
    ParamRef,
    SiblingLinear,
    SoftmaxTopK,
    StaticGate,
    TreePathGates,
    verify,
)
from moleforge.passes import collapse_linear_trees, hoist_frozen_down, hoist_tree_down_projections
from moleforge.specs import (
    CorePool,
    CV2ImportanceLoad,
    DenseRouter,
    ExpertPool,
    ImplicitTopKRouter,
    LoRA,
    LoRASource,
    PreserveLoss,
    ResidualTree,
    RouterZLoss,
    SparseRandom,
    StaticRouter,
    TopKRouter,
    TopPRouter,
    TreeLevel,
    TreeRouter,
)

VERIFIER = importlib.import_module("moleforge.ir.verify")
VERIFIERS = (VERIFIER, importlib.import_module("moleforge.ir.verify_basics"),
             importlib.import_module("moleforge.ir.verify_kronecker"),
             importlib.import_module("moleforge.ir.verify_dora"))
"""The modules whose rules hold verifier messages (EPT's and DoRA experts' nodes have theirs in modules of
their own)."""


# ---- valid graphs to corrupt ---------------------------------------------------------------

def _build(adapter, d_in: int = 5, d_out: int = 7) -> Graph:
    return verify(build_graph(adapter, SiteShape("s", d_in, d_out)))


def _pool(router=None, **kw) -> Graph:
    """x -> logits -> route -> mix: A (3, 2, 5), B (3, 7, 2), router_w (3, 5)."""
    return _build(ExpertPool(experts=3, rank=2, router=router or TopKRouter(k=2), **kw))


def _lora() -> Graph:
    """x -> h (A (2, 5)) -> up (B (7, 2))."""
    return _build(LoRA(rank=2))


def _tree(**kw) -> Graph:
    """Two levels of 2 rank-2 experts, fanout 1: widths 4 and 8, W1 (8, 4), d_in 6, d_out 9."""
    levels = [TreeLevel(experts=2, rank=2, fanout=1)] * 2
    return _build(ResidualTree(levels=levels, router=TreeRouter(down_dim=4, key_dim=3), **kw), 6, 9)


def _block(gate: bool = True, roles=("gate", "up", "down")) -> Graph:
    """An FFN block 5 -> 8 -> 7 with three experts: up (biased), down and (optionally) gate."""
    linears = {"up": BlockLinear("up", "up", 5, 8, True, False),
               "down": BlockLinear("down", "down", 8, 7, False, False)}
    if gate:
        linears["gate"] = BlockLinear("gate", "gate", 5, 8, False, False)
    pool = ExpertPool(experts=3, rank=2, router=TopKRouter(k=2))
    used = sorted(r for r in roles if r in linears)
    return verify(build_block_graph(pool, linears, "silu", used, SiteShape("s", 5, 7)))


def _hoisted_block() -> Graph:
    """The block with its down projection hoisted: expert_hidden, expert_sum, expert_lora."""
    return verify(hoist_frozen_down(_block()))


def _nodes(g: Graph, **swap) -> tuple:
    return tuple(swap.get(n.id, n) for n in g.nodes)


def _declare(g: Graph, **shapes) -> tuple[ParamDecl, ...]:
    """``g.params`` with the named ones redeclared (or added) with new shapes."""
    out = [replace(p, shape=shapes.pop(p.name)) if p.name in shapes else p for p in g.params]
    return tuple(out) + tuple(ParamDecl(name, shape, "up") for name, shape in shapes.items())


def _redeclare_frozen(g: Graph, **shapes) -> tuple[ParamDecl, ...]:
    return tuple(replace(p, shape=shapes[p.name]) if p.name in shapes else p for p in g.frozen)


def _tree_level(g: Graph, l: int, **changes) -> Graph:
    """``g`` with level ``l`` of its ``tree`` node changed; the ``ParamRef`` changes are
    redeclared with their shapes."""
    tree = g.node("tree")
    levels = list(tree.levels)
    levels[l] = replace(levels[l], **changes)
    shapes = {r.name: r.shape for r in changes.values() if isinstance(r, ParamRef)}
    return g.replace(params=_declare(g, **shapes), nodes=_nodes(g, tree=replace(tree, levels=tuple(levels))))


def _expert(g: Graph, role: str, **changes) -> Graph:
    """``g`` with the expert linear ``role`` of its ``experts`` node changed."""
    node = g.node("experts")
    return g.replace(nodes=_nodes(g, experts=replace(node, **{role: replace(getattr(node, role), **changes)})))


# ---- the cases -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    rule: str
    """The function of ``ir/verify.py`` whose message the case produces."""
    message: str
    """A regular expression the problem must match."""
    build: Callable[[], Graph]
    alone: bool = True
    """Whether it is the graph's only problem (some breaks also break what reads them)."""


CASES: dict[str, Case] = {}


def case(rule: str, message: str, alone: bool = True):
    def register(build: Callable[[], Graph]):
        CASES[build.__name__] = Case(rule, message, build, alone)
        return build
    return register


@case("_structure", "defined twice", alone=False)
def duplicate_id():
    g = _pool()
    return g.replace(nodes=g.nodes + (g.nodes[1],))


@case("_structure", r"reads %logits before it is defined; nodes must be topologically ordered")
def use_before_definition():
    g = _pool()
    nodes = list(g.nodes)
    nodes[1], nodes[2] = nodes[2], nodes[1]
    return g.replace(nodes=tuple(nodes))


@case("_structure", "expected exactly one input node, found 2")
def two_inputs():
    g = _pool()
    return g.replace(nodes=(Input(id="y", width=5),) + g.nodes)


@case("_structure", "input width 5 != d_in 6")
def input_width():
    return _pool().replace(d_in=6)


@case("_structure", "parameter and frozen input names are not unique")
def duplicate_parameter_names():
    g = _pool()
    return g.replace(params=g.params + (g.params[0],))


@case("_expr", "weight reads undeclared parameter 'nowhere'")
def undeclared_parameter():
    g = _pool()
    return g.replace(nodes=_nodes(g, logits=Linear(id="logits", src="x", weight=ParamRef("nowhere", (3, 5)))))


@case("_expr", r"weight expects router_w of shape \(3, 5\), declared \(3, 4\)")
def parameter_shape_disagrees_with_declaration():
    g = _pool()
    return g.replace(params=_declare(g, router_w=(3, 4)))


@case("_expr", r"bias: malformed expression \(")
def malformed_expression():
    g = _lora()
    h = replace(g.node("h"), bias=BlockRows(ParamRef("hb", (2,))))  # rows of a vector
    return g.replace(params=_declare(g, hb=(2,)), nodes=_nodes(g, h=h))


@case("_need", r"%pg is not a Route \(a flat routing\): its type cannot be inferred", alone=False)
def routing_of_unknown_type():
    g = _pool()
    pg = TreePathGates(id="pg", routing="route", level=0)  # reads a flat routing: no type
    nodes = g.nodes[:3] + (pg, replace(g.node("mix"), routing="pg"))
    return g.replace(nodes=nodes)


@case("_need", r"%logits is not a Route \(a flat routing\); it yields a tensor \(T, 3\)", alone=False)
def routing_input_must_be_a_router():
    g = _pool()
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), routing="logits")))


@case("_need_tensor", "source %route is not a tensor")
def source_must_be_a_tensor():
    g = _pool()
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), src="route")))


@case("_linear", "weight shape (.*) does not read width 5")
def linear_reads_wrong_width():
    g = _lora()
    nodes = _nodes(g, h=Linear(id="h", src="x", weight=ParamRef("A", (2, 4))))
    return g.replace(params=_declare(g, A=(2, 4)), nodes=nodes)


@case("_linear", r"bias shape \(3,\) != \(2,\)")
def linear_bias_shape():
    g = _lora()
    h = Linear(id="h", src="x", weight=ParamRef("A", (2, 5)), bias=ParamRef("hb", (3,)))
    return g.replace(params=_declare(g, hb=(3,)), nodes=_nodes(g, h=h))


@case("_linear", r"group columns \[0:3\] do not hold the 2 outputs of the weight")
def sibling_columns():
    g = _lora()
    h = SiblingLinear(id="h", src="x", weight=ParamRef("A", (2, 5)), group="qkv", start=0, stop=3)
    return g.replace(nodes=_nodes(g, h=h))


@case("_columns", r"columns \[1:3\] outside width 2")
def columns_outside():
    g = _lora()
    cols = Columns(id="hc", src="h", start=1, stop=3)
    nodes = (g.nodes[0], g.node("h"), cols, replace(g.node("up"), src="hc"))
    return g.replace(nodes=nodes)


@case("_add", r"terms have different widths \[7, 2\]")
def add_widths():
    g = _lora()
    return g.replace(nodes=g.nodes + (Add(id="sum", srcs=("up", "h")),), output="sum")


@case("_static_gate", r"static weights have shape \(2,\), router has 3 experts")
def static_weights():
    g = _pool(StaticRouter())
    route = replace(g.node("route"), gate=StaticGate(weights=ParamRef("router_w", (2,))))
    return g.replace(params=_declare(g, router_w=(2,)), nodes=_nodes(g, route=route))


@case("_scored_gate", "scores have width 4, router has 3 experts")
def scores_width():
    g = _pool()
    logits = replace(g.node("logits"), weight=ParamRef("router_w", (4, 5)))
    return g.replace(params=_declare(g, router_w=(4, 5)), nodes=_nodes(g, logits=logits))


@case("_scored_gate", r"k = 4 outside 1\.\.3")
def top_k_outside():
    g = _pool()
    return g.replace(nodes=_nodes(g, route=replace(g.node("route"), gate=SoftmaxTopK(k=4))))


@case("_block_gate", "width 3 != experts 3 x rank 2")
def block_gate_width():
    g = _build(ExpertPool(experts=3, rank=1, down=SparseRandom(), router=ImplicitTopKRouter(k=2)))
    return g.replace(nodes=_nodes(g, gated=replace(g.node("gated"), rank=2)))


@case("_gate_bias", r"bias shape \(2, 7\) is neither \(3, d\) nor \(d,\)")
def gate_bias_shape():
    g = _pool()
    gb = GateBias(id="gb", routing="route", bias=ParamRef("gbias", (2, 7)))
    nodes = g.nodes + (gb, Add(id="out", srcs=("mix", "gb")))
    return g.replace(params=_declare(g, gbias=(2, 7)), nodes=nodes, output="out")


@case("_path_gates", "level 5 outside the router's 2 pools", alone=False)
def path_gates_level():
    g = verify(collapse_linear_trees(_tree(activation="identity")))
    return g.replace(nodes=_nodes(g, tree0_gates=replace(g.node("tree0_gates"), level=5)))


@case("_aux", r"%logits is not a Route/TreeRoute \(a routing\); it yields a tensor \(T, 3\)")
def aux_reads_a_tensor():
    g = _pool(aux_losses=[CV2ImportanceLoad()])
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), routing="logits")))


@case("_aux", "tsallis_entropy needs a flat routing, got a tree routing .*")
def entropy_loss_of_a_tree():
    g = _tree(aux_losses=[CV2ImportanceLoad()])
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), kind="tsallis_entropy")))


@case("_top_p_gate", r"top_p gate with p = 1.5, threshold = 0.9, q = 1.1: needs 0 < p <= 1, "
      r"0 <= threshold <= 1 and q > 0")
def top_p_outside_its_range():
    g = _pool(TopPRouter(k=1))
    return g.replace(nodes=_nodes(g, route=replace(g.node("route"), gate=replace(g.node("route").gate, top_p=1.5))))


def _core() -> Graph:
    """CoMoL: x -> h (A (2, 5)) -> logits (router_w (3, 2)) -> route -> mix (cores (3, 2, 2), B (7, 2))."""
    return _build(CorePool(experts=3, rank=2))


@case("_core_rules", r"cores have shape \(3, 3, 2\), expected \(3, 2, 2\): one r x r core per expert on the "
      "width-2 source")
def cores_of_another_width():
    g = _core()
    cores = ParamRef("cores3", (3, 3, 2))
    g = g.replace(params=g.params + (ParamDecl(name="cores3", shape=(3, 3, 2), init="kaiming"),))
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), cores=cores)))


@case("_core_rules", r"B has shape \(7, 3\), expected \(d_out, 2\)")
def core_up_projection_of_another_rank():
    g = _core()
    g = g.replace(params=g.params + (ParamDecl(name="B3", shape=(7, 3), init="up"),))
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), b=ParamRef("B3", (7, 3)))))


@case("_aux", "switch_lb needs a softmax top-k router")
def switch_lb_on_dense():
    g = _pool(DenseRouter(), aux_losses=[CV2ImportanceLoad()])
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), kind="switch_lb")))


@case("_pool_rules", r"A \(2, 5\) and B \(3, 7, 2\) must be stacked \(E, r, d_in\) / \(E, d_out, r\)")
def pool_factors_not_stacked():
    g = _pool()
    return g.replace(params=_declare(g, A=(2, 5)), nodes=_nodes(g, mix=replace(g.node("mix"), a=ParamRef("A", (2, 5)))))


@case("_pool_rules", r"A has 2 and B 3 experts; router has 3 \(1 means shared\)")
def pool_expert_count():
    g = _pool()
    mix = replace(g.node("mix"), a=ParamRef("A", (2, 2, 5)))
    return g.replace(params=_declare(g, A=(2, 2, 5)), nodes=_nodes(g, mix=mix))


@case("_pool_rules", "A reads width 4, source has 5")
def pool_reads_wrong_width():
    g = _pool()
    mix = replace(g.node("mix"), a=ParamRef("A", (3, 2, 4)))
    return g.replace(params=_declare(g, A=(3, 2, 4)), nodes=_nodes(g, mix=mix))


@case("_pool_rules", r"rank of A \(2\) != rank of B \(3\)")
def pool_rank_mismatch():
    g = _pool()
    mix = replace(g.node("mix"), b=ParamRef("B", (3, 7, 3)))
    return g.replace(params=_declare(g, B=(3, 7, 3)), nodes=_nodes(g, mix=mix))


@case("_pool_rules", r"grouped_mix needs a sparse \(top-k\) router")
def grouped_mix_on_dense():
    g = _pool(DenseRouter())
    m = g.node("mix")
    grouped = GroupedMix(id="mix", src=m.src, routing=m.routing, a=m.a, b=m.b, scale=m.scale)
    return g.replace(nodes=_nodes(g, mix=grouped))


@case("_tree_rules", "router has 2 pools, tree has 1", alone=False)
def tree_pool_count():
    g = _tree()
    tree = g.node("tree")
    return g.replace(nodes=_nodes(g, tree=replace(tree, levels=tree.levels[:1])))


@case("_tree_rules", "pool 0 has 2 experts, its router 5")
def tree_router_experts():
    g = _tree()
    route = g.node("route")
    levels = (replace(route.levels[0], experts=5),) + route.levels[1:]
    return g.replace(nodes=_nodes(g, route=replace(route, levels=levels)))


@case("_tree_rules", r"pool 1 width 9 != d_l \+ s\*r = 8", alone=False)
def tree_level_width():
    return _tree_level(_tree(), 1, b=ParamRef("B1", (2, 9, 2)))


@case("_tree_rules", "pool 1: a level transform W exists exactly for l >= 1")
def tree_transform_missing():
    return _tree_level(_tree(), 1, w=None, w_bias=None)


@case("_tree_rules", r"pool 1: W shape \(8, 3\) != \(8, 4\)")
def tree_transform_shape():
    return _tree_level(_tree(), 1, w=ParamRef("W1", (8, 3)))


@case("_tree_rules", "source width 6 != total rank 8", alone=False)
def tree_propagate_source():
    g = verify(hoist_tree_down_projections(_tree()))
    return g.replace(nodes=_nodes(g, tree=replace(g.node("tree"), src="x")))


@case("_tree_rules", "A reads width 5, source has 6")
def tree_reads_wrong_width():
    return _tree_level(_tree(), 0, a=ParamRef("A0", (2, 2, 5)))


@case("_expert_factor_rules", r"up: A \(3, 5\) and B \(3, 8, 2\) must be stacked")
def expert_factors_not_stacked():
    g = _block()
    return _expert(g, "up", a=ParamRef("A_up", (3, 5))).replace(params=_declare(g, A_up=(3, 5)))


@case("_expert_factor_rules", "up: A has 2 and B 3 experts; the router has 3")
def expert_count():
    g = _block()
    return _expert(g, "up", a=ParamRef("A_up", (2, 2, 5))).replace(params=_declare(g, A_up=(2, 2, 5)))


@case("_expert_factor_rules", "up: A reads width 4, its input has 5")
def expert_reads_wrong_width():
    g = _block()
    return _expert(g, "up", a=ParamRef("A_up", (3, 2, 4))).replace(params=_declare(g, A_up=(3, 2, 4)))


@case("_expert_factor_rules", r"up: rank of A \(3\) != rank of B \(2\)")
def expert_rank():
    g = _block()
    return _expert(g, "up", a=ParamRef("A_up", (3, 3, 5))).replace(params=_declare(g, A_up=(3, 3, 5)))


@case("_expert_linear_rules", r"up: 'W_up' must be a frozen input \(declared in graph.frozen\)")
def expert_weight_not_frozen():
    g = _block()
    w = next(d for d in g.frozen if d.name == "W_up")
    return g.replace(params=g.params + (replace(w, init="kaiming"),),
                     frozen=tuple(d for d in g.frozen if d.name != "W_up"))


@case("_expert_linear_rules", "up: give both expert factors A and B, or neither")
def expert_half_factors():
    return _expert(_block(), "up", b=None)


@case("_expert_linear_rules", r"up: weight \(8, 4\) does not read width 5")
def expert_weight_width():
    g = _block()
    return _expert(g, "up", weight=ParamRef("W_up", (8, 4))).replace(frozen=_redeclare_frozen(g, W_up=(8, 4)))


@case("_expert_linear_rules", r"up: bias \(9,\) != \(8,\)")
def expert_bias():
    g = _block()
    return _expert(g, "up", bias=ParamRef("b_up", (9,))).replace(frozen=_redeclare_frozen(g, b_up=(9,)))


@case("_expert_linear_rules", "up: B writes width 9, the frozen weight 8")
def expert_up_width():
    g = _block()
    return _expert(g, "up", b=ParamRef("B_up", (3, 9, 2))).replace(params=_declare(g, B_up=(3, 9, 2)))


@case("_expert_linear_rules", "up: a DoRA magnitude 'M_up' needs expert factors A and B; drop it or add them")
def expert_magnitude_without_factors():
    return _expert(_block(roles=("gate", "down")), "up", magnitude=ParamRef("M_up", (3, 8)))


@case("_expert_linear_rules", r"up: magnitude \(3, 7\) != \(3, 8\), one per expert and output row")
def expert_magnitude_shape():
    g = _block()
    return _expert(g, "up", magnitude=ParamRef("M_up", (3, 7))).replace(params=_declare(g, M_up=(3, 7)))


@case("_expert_block_rules", "gate width 9 != up width 8")
def expert_gate_width():
    g = _block(roles=("up", "down"))
    return _expert(g, "gate", weight=ParamRef("W_gate", (9, 5))).replace(frozen=_redeclare_frozen(g, W_gate=(9, 5)))


@case("_expert_block_rules", "%x is a frozen gate projection but the block has no gate")
def gate_projection_without_gate():
    g = _block(gate=False)
    return g.replace(nodes=_nodes(g, experts=replace(g.node("experts"), gate_base="x")))


@case("_expert_block_rules", "frozen projection %x has width 5, expected 8")
def frozen_projection_width():
    g = _block()
    return g.replace(nodes=_nodes(g, experts=replace(g.node("experts"), up_base="x")))


@case("_block_dropout", r"dropout probability 1\.0 outside \[0, 1\)")
def block_dropout_probability():
    g = _block()
    return g.replace(nodes=_nodes(g, experts=replace(g.node("experts"), dropout=1.0)))


@case("_block_dropout", r"dropout probability -0\.5 outside \[0, 1\)")
def expert_lora_dropout_probability():
    g = _hoisted_block()
    return g.replace(nodes=_nodes(g, experts_down_lora=replace(g.node("experts_down_lora"), dropout=-0.5)))


@case("_expert_value_rules", "%x is not an expert_hidden value", alone=False)
def expert_sum_of_a_tensor():
    g = _hoisted_block()
    return g.replace(nodes=_nodes(g, experts_sum=replace(g.node("experts_sum"), src="x")))


@case("_expert_value_rules", "%experts_hidden is routed by %route, this node by %route2")
def expert_sum_by_another_router():
    g = _hoisted_block()
    nodes = list(_nodes(g, experts_sum=replace(g.node("experts_sum"), routing="route2")))
    nodes.insert(3, replace(g.node("route"), id="route2"))
    return g.replace(nodes=tuple(nodes))


@case("_outputs", "output %nowhere is not defined")
def output_undefined():
    return _pool().replace(output="nowhere")


@case("_outputs", "output %route is not a tensor", alone=False)
def output_not_a_tensor():
    return _pool().replace(output="route")


@case("_outputs", "output width 7 != d_out 8")
def output_width():
    return _pool().replace(d_out=8)


@case("_outputs", "aux %mix is not an aux loss")
def aux_must_name_aux_losses():
    return _pool().replace(aux=("mix",))


@case("_outputs", r"dead nodes \(nothing reads them\): %unused")
def dead_node():
    g = _pool()
    return g.replace(nodes=g.nodes + (Linear(id="unused", src="x", weight=ParamRef("router_w", (3, 5))),))


# ---- input dropout, capacity, z-loss, ragged pools ---------------------------------------------

def _ragged() -> Graph:
    """A FlexMoRE pool of ranks 1, 2, 3: A (6, 5), B (7, 6), top-2 with capacity and a z-loss."""
    return _build(ExpertPool(experts=3, ranks=[1, 2, 3], router=TopKRouter(k=2), capacity_factor=1.0,
                             dropout=0.2, aux_losses=[RouterZLoss()]))


@case("_dropout", r"dropout probability 1\.5 outside \[0, 1\)")
def dropout_probability():
    g = _ragged()
    return g.replace(nodes=_nodes(g, drop=replace(g.node("drop"), p=1.5)))


@case("_capacity", "capacity needs a top-k routing; %route sends every token to every expert")
def capacity_of_dense_routing():
    g = _build(ExpertPool(experts=3, rank=2, router=DenseRouter()))
    cap = CapacityLimit(id="capacity", routing="route", factor=1.0)
    mix = replace(g.node("mix"), routing="capacity")
    return g.replace(nodes=g.nodes[:-1] + (cap, mix))


@case("_capacity", r"capacity factor 0\.0 is not positive")
def capacity_factor_zero():
    g = _ragged()
    return g.replace(nodes=_nodes(g, capacity=replace(g.node("capacity"), factor=0.0)))


@case("_z_loss", "a z-loss must be listed among the graph's aux losses", alone=False)
def z_loss_not_an_aux_loss():
    g = _ragged()
    return g.replace(aux=())


@case("_ragged_mix", "2 ranks and 3 scales for a router of 3 experts")
def ragged_rank_count():
    g = _ragged()
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), ranks=(3, 3))))


@case("_ragged_mix", r"A has shape \(5, 5\), expected \(sum of ranks 6, source width 5\)")
def ragged_a_shape():
    g = _ragged()
    return g.replace(params=_declare(g, A=(5, 5)), nodes=_nodes(g, mix=replace(g.node("mix"), a=ParamRef("A", (5, 5)))))


@case("_ragged_mix", r"B has shape \(7, 5\), expected \(d_out, sum of ranks 6\)")
def ragged_b_shape():
    g = _ragged()
    return g.replace(params=_declare(g, B=(7, 5)), nodes=_nodes(g, mix=replace(g.node("mix"), b=ParamRef("B", (7, 5)))))


@case("_ragged_mix", r"the grouped form needs a sparse \(top-k\) routing")
def ragged_grouped_on_dense():
    g = _build(ExpertPool(experts=3, ranks=[1, 2, 3], router=DenseRouter()))
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), grouped=True)))


def _dora() -> Graph:
    """A DoRA LoRA of rank 2 on 5 -> 7: frozen W (7, 5), magnitude (7,)."""
    return _build(LoRA(rank=2, magnitude=True))


@case("dora_fields", "W 'W' must be a frozen input \\(declared in graph.frozen\\)")
def dora_weight_not_frozen():
    g = _dora()
    return g.replace(frozen=(), params=g.params + g.frozen)


@case("_magnitude", r"reads widths \(5, 7\), W \(6, 5\) needs \(5, 6\)", alone=False)
def dora_weight_width():
    g = _dora()
    w = ParamRef("W", (6, 5))
    return g.replace(frozen=(replace(g.frozen[0], shape=(6, 5)),),
                     nodes=_nodes(g, dora=replace(g.node("dora"), weight=w)))


@case("_magnitude", r"A \(2, 5\), B \(7, 2\) and magnitude \(6,\) do not fit W \(7, 5\)")
def dora_magnitude_shape():
    g = _dora()
    m = ParamRef("magnitude", (6,))
    return g.replace(params=_declare(g, magnitude=(6,)), nodes=_nodes(g, dora=replace(g.node("dora"), magnitude=m)))


def _preserved() -> Graph:
    """A pool of one trainable and one frozen expert from folders, with LoRA-Mixer's preserve loss."""
    pool = ExpertPool(experts=2, rank=2, router=DenseRouter(), aux_losses=[PreserveLoss(weight=0.3)],
                      experts_from=[LoRASource(path="e0", trainable=True), LoRASource(path="e1")])
    return build_graph(pool, SiteShape("s", 6, 5))


@case("_preserve", r"A_0_1 \(1, 2, 6\) and its starting value B_0_1_start \(1, 5, 2\) differ in shape")
def preserve_shapes():
    g = _preserved()
    (a, _), (_, b_start) = g.node("aux0").pairs
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), pairs=((a, b_start),))))


@case("_preserve", r"A_0_1 must be trainable and A_0_1 a buffer")
def preserve_against_itself():
    g = _preserved()
    a = g.node("aux0").pairs[0][0]
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), pairs=((a, a),))))


# ---- the tests ---------------------------------------------------------------------------------

def problems(g: Graph) -> list[str]:
    """The problems ``verify`` raises for ``g`` (the error's ``  - `` lines), checking that the
    graph follows them."""
    with pytest.raises(IRVerificationError) as info:
        verify(g)
    text = str(info.value)
    assert text.startswith(f"graph {g.label!r} failed verification:")
    assert f"graph {g.label} (d_in=" in text or "Input(id=" in text, "the graph follows the problems"
    return [line[4:] for line in text.splitlines() if line.startswith("  - ")]


def test_valid_graphs_verify():
    for build in (_pool, _lora, _tree, _block, _hoisted_block):
        verify(build())
    for a in (LoRA(), ExpertPool(), ResidualTree()):
        verify(build_graph(a, SiteShape("s", 6, 9)))


@pytest.mark.parametrize("name", list(CASES))
def test_broken_rule_is_reported(name):
    c = CASES[name]
    found = problems(c.build())
    assert any(re.search(c.message, p) for p in found), f"{c.message!r} not in {found}"
    if c.alone:
        assert len(found) == 1, f"more than the one problem: {found}"


def _template(node: ast.expr) -> re.Pattern:
    """A message template (an f-string or a string) as a pattern: its text, anything for each
    interpolation, after the ``%node: `` prefix of node rules."""
    if isinstance(node, ast.Constant):
        body = re.escape(node.value)
    else:
        body = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".*?" for v in node.values)
    return re.compile(r"(?:%[\w.]+: )?" + body, re.S)


def verifier_messages() -> dict[tuple[str, str], re.Pattern]:
    """Every message template of ``ir/verify.py``, by (function, source): the strings a rule
    appends to its problems or returns in a list (``verify`` itself only formats them)."""
    out = {}
    for fn in (f for module in VERIFIERS for f in ast.parse(inspect.getsource(module)).body):
        if not isinstance(fn, ast.FunctionDef) or fn.name == "verify":
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append":
                found = node.args[:1]
            elif isinstance(node, ast.List):
                found = node.elts
            else:
                continue
            for s in found:
                if isinstance(s, ast.JoinedStr) or (isinstance(s, ast.Constant) and isinstance(s.value, str)):
                    out[(fn.name, ast.unparse(s))] = _template(s)
    return out


def test_every_verifier_message_has_a_negative_test():
    messages = verifier_messages()
    assert len(messages) >= 50, "the parser no longer finds the verifier's messages"
    rules = {fn for fn, _ in messages}
    assert {c.rule for c in CASES.values()} <= rules, "a case names a function without messages"
    produced = {name: problems(c.build()) for name, c in CASES.items()}
    untested = [f"{fn}: {src}" for (fn, src), pattern in messages.items()
                if not any(c.rule == fn and any(pattern.fullmatch(p) for p in produced[name])
                           for name, c in CASES.items())]
    assert not untested, "verifier messages without a negative test:\n" + "\n".join(untested)


# ---- routing by task ------------------------------------------------------------------------

def _task_pool(**router) -> Graph:
    from moleforge.specs import TaskEmbeddingRouter

    return _pool(TaskEmbeddingRouter(tasks=2, **router))


@case("_task_scores", r"task table has shape \(3, 3\), expected \(tasks, experts\) = \(2, 3\)")
def task_table_shape():
    g = _task_pool()
    scores = replace(g.node("task_scores"), table=ParamRef("task_table", (3, 3)))
    return g.replace(params=_declare(g, task_table=(3, 3)), nodes=_nodes(g, task_scores=scores))


@case("_task_scores", r"hard task routing \(no table\) sends task t to expert t: it needs tasks <= experts and no "
                      r"token scores \(tasks = 2, experts = 3, token_scores = True\)")
def hard_task_routing_with_token_scores():
    g = _task_pool()
    scores = replace(g.node("task_scores"), table=None)
    return g.replace(params=tuple(p for p in g.params if p.name != "task_table"), nodes=_nodes(g, task_scores=scores))


@case("_task_scores", r"token scores %logits have width 4, the router has 3 experts", alone=False)
def task_token_scores_width():
    g = _task_pool()
    logits = replace(g.node("logits"), weight=ParamRef("router_w", (4, 5)))
    return g.replace(params=_declare(g, router_w=(4, 5)), nodes=_nodes(g, logits=logits))


@case("_aux", r"task_routing needs a flat softmax router \(top-k or dense\)")
def task_routing_on_a_static_gate():
    g = _pool(StaticRouter())
    from moleforge.ir import AuxLoss

    aux = AuxLoss(id="aux0", routing="route", kind="task_routing", weight=0.1)
    return g.replace(nodes=(*g.nodes, aux), aux=("aux0",))


@case("_aux", r"rsl needs a flat softmax router")
def rsl_on_a_static_gate():
    g = _pool(StaticRouter())
    from moleforge.ir import AuxLoss

    aux = AuxLoss(id="aux0", routing="route", kind="rsl", weight=0.1, entropy=0.1, top_k=1)
    return g.replace(nodes=(*g.nodes, aux), aux=("aux0",))


# ---- X-LoRA ---------------------------------------------------------------------------------

def _xlora_pool(**router) -> Graph:
    from moleforge.specs import XLoRARouter

    return _build(ExpertPool(experts=3, rank=2, router=XLoRARouter(**router), frozen_experts=True))


@case("_xlora_gate", r"an xlora gate reads the site's X-LoRA scalings; %x is a Input")
def xlora_gate_on_the_input():
    g = _xlora_pool()
    return g.replace(nodes=_nodes(g, route=replace(g.node("route"), src="x")))


@case("_xlora_gate", r"scalings have width 2, router has 3 experts")
def xlora_scalings_narrower_than_the_pool():
    g = _xlora_pool()
    return g.replace(nodes=_nodes(g, scalings=replace(g.node("scalings"), experts=2)))


@case("_xlora_gate", r"top_k = 4 outside \[1, 3\]")
def xlora_top_k_above_the_experts():
    g = _xlora_pool(top_k=2)
    route = g.node("route")
    return g.replace(nodes=_nodes(g, route=replace(route, gate=replace(route.gate, top_k=4))))


# ---- EPT: Kronecker experts, task embeddings and factors, the contrastive loss ---------------

def _ept() -> Graph:
    """x -> x_task (task_embedding (2, 6)) -> logits -> route -> mix (meta_A (2, 3), meta_B (5, 2),
    K0 (1, 1), K1 (2, 2)) -> per_task; aux0 the contrastive loss."""
    from moleforge.specs import KroneckerPool, TaskContrastiveLoss

    return _build(KroneckerPool(kernels=[2, 2], rank=2, tasks=2, task_frequencies=[1.0, 2.0],
                                aux_losses=[TaskContrastiveLoss()]), d_in=6, d_out=10)


@case("_kronecker_mix", r"1 kernels for a router of 2 experts")
def kronecker_kernels_fewer_than_experts():
    g = _ept()
    return g.replace(nodes=_nodes(g, mix=replace(g.node("mix"), kernels=g.node("mix").kernels[:1])))


@case("_kronecker_mix", r"A \(3, 3\) and B \(5, 2\) disagree on the meta-seed rank")
def kronecker_seed_ranks_disagree():
    g = _ept()
    return g.replace(params=_declare(g, meta_A=(3, 3)),
                     nodes=_nodes(g, mix=replace(g.node("mix"), a=ParamRef("meta_A", (3, 3)))))


@case("_kronecker_mix", r"K1 has shape \(2, 3\), expected a square kernel")
def kronecker_kernel_not_square():
    g = _ept()
    k = g.node("mix").kernels
    return g.replace(params=_declare(g, K1=(2, 3)),
                     nodes=_nodes(g, mix=replace(g.node("mix"), kernels=(k[0], ParamRef("K1", (2, 3))))))


@case("_kronecker_mix", r"expert 0 slices \(10, 6\) beyond the meta-seed \(5, 3\)")
def kronecker_slice_beyond_the_seed():
    g = _ept()
    k = g.node("mix").kernels
    return g.replace(params=_declare(g, K0=(1, 1)),
                     nodes=_nodes(g, mix=replace(g.node("mix"), kernels=(ParamRef("K0", (1, 1)), k[1]))))


@case("_task_embed", r"table has shape \(2, 5\), expected \(tasks, 6\)", alone=False)
def task_embedding_of_another_width():
    g = _ept()
    table = ParamRef("task_embedding", (2, 5))
    return g.replace(params=_declare(g, task_embedding=(2, 5)),
                     nodes=_nodes(g, x_task=replace(g.node("x_task"), table=table),
                                  aux0=replace(g.node("aux0"), table=table)))


@case("_task_scale", r"no per-task factors")
def task_scale_without_factors():
    g = _ept()
    return g.replace(nodes=_nodes(g, per_task=replace(g.node("per_task"), factors=())))


@case("_task_contrastive", r"table has shape \(2, 5\), expected \(tasks, 6\)")
def contrastive_table_of_another_width():
    g = _ept()
    return g.replace(params=_declare(g, other=(2, 5)),
                     nodes=_nodes(g, aux0=replace(g.node("aux0"), table=ParamRef("other", (2, 5)))))


@case("_task_contrastive", r"temperature 0 is not positive")
def contrastive_without_temperature():
    g = _ept()
    return g.replace(nodes=_nodes(g, aux0=replace(g.node("aux0"), temperature=0)))


@case("_task_contrastive", r"a contrastive loss must be listed among the graph's aux losses")
def contrastive_not_an_aux_output():
    g = _ept()
    return g.replace(aux=())


# ---- DoRA experts ------------------------------------------------------------------------------

def _dora_pool() -> Graph:
    """x -> logits -> route -> mix: pool_magnitude with A (3, 2, 5), B (3, 7, 2), magnitude (3, 7), W (7, 5)."""
    return _build(ExpertPool(experts=3, rank=2, magnitude=True, router=TopKRouter(k=2)))


@case("dora_fields", r"W 'W' must be a frozen input \(declared in graph.frozen\)")
def dora_pool_weight_not_frozen():
    g = _dora_pool()
    return g.replace(frozen=(), params=g.params + g.frozen)


@case("_pool_magnitude", r"reads width 5, W \(7, 4\) needs 4", alone=False)
def dora_pool_weight_of_another_width():
    g = _dora_pool()
    w = ParamRef("W", (7, 4))
    return g.replace(frozen=(replace(g.frozen[0], shape=(7, 4)),),
                     nodes=_nodes(g, mix=replace(g.node("mix"), weight=w)))


@case("_pool_magnitude", r"A \(3, 2, 5\), B \(3, 7, 2\) and magnitude \(2, 7\) do not fit 3 experts on W \(7, 5\)")
def dora_pool_magnitude_of_fewer_experts():
    g = _dora_pool()
    return g.replace(params=_declare(g, magnitude=(2, 7)),
                     nodes=_nodes(g, mix=replace(g.node("mix"), magnitude=ParamRef("magnitude", (2, 7)))))
