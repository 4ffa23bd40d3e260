"""The explanation of FFN-block sites (``scope: "ffn_block"``): the block as recognised (its
linears by their paths in the model, its activation), the routed experts, parameters, the split
of its FLOPs into the adapter's and the frozen block's, the kernel the lowering runs, and Γ."""

from __future__ import annotations

import math
from typing import Mapping

from ..backends.torch_fx.lower import runs_as_routed_ffn
from ..ir import AuxLoss, CapacityLimit, ExpertFFN, ExpertHidden, ExpertLinear, ExpertLoRA, Graph, Route
from .explain_text import (
    ROLES,
    SiteRow,
    block_node,
    field,
    field_lines,
    gamma_text,
    parameters_text,
    router_text,
    where,
)
from .flops import adapter_flops_per_token, base_flops_per_token, flops_per_token, frozen_flops_per_token

__all__ = ["block_fields"]

def block_fields(members: list[SiteRow], costs: bool = True) -> list[str]:
    """The explanation of a group of identical FFN-block sites: a heading, then the block as
    recognised, its linears, the adapter, parameters, FLOPs (whole block, adapter, frozen GEMMs),
    the frozen block's FLOPs, the kernel and Γ; ``costs=False`` leaves out the parameters and
    FLOPs (``moleforge inspect`` prints them in its own tables)."""
    first = members[0]
    g, final = first.plain, first.final
    node = block_node(g)
    assert node is not None, f"{first.name} is not an FFN-block site"
    short = _short_names(first)
    d_ff = node.up.weight.shape[0]
    blocks = f"{len(members)} FFN blocks" if len(members) > 1 else "1 FFN block"
    lines = [f"== {where([m.name for m in members])}  ({blocks}, d_in {g.d_in} -> d_ff {d_ff} -> d_out {g.d_out})"]
    lines += field_lines("block", [f"recognised y = {_formula(node, short)}, activation {node.activation}",
                              "replaced by routed experts (scope ffn_block)"])
    lines += field_lines("linears", _linears_lines(members, node))
    lines += field("adapter", _describe_block(g, node, short))
    if costs:
        lines += field("parameters", parameters_text(g))
        lines += field_lines("FLOPs/token", _block_flops(g, final))
        lines += field("base FLOPs", _block_base_flops(final, short))
    lines += field("kernel", _block_kernel(final, short))
    lines += field("Γ", gamma_text(g))
    return lines


def _short_names(site: SiteRow) -> dict[str, str]:
    """Each linear's path below the closest module holding all of the block's linears
    (``gate_proj``; BERT's ``intermediate.dense``), or its role when the paths are not known."""
    if not site.linears:
        return {role: role for role in ROLES}
    parts = [path.split(".") for path in site.linears.values()]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {role: ".".join(path.split(".")[common:]) for role, path in site.linears.items()}


def _expert_linears(node: ExpertFFN) -> dict[str, ExpertLinear]:
    linears = {"gate": node.gate, "up": node.up, "down": node.down}
    return {role: lin for role, lin in linears.items() if lin is not None}


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _hidden(node: ExpertFFN | ExpertHidden, short: Mapping[str, str]) -> str:
    """The hidden state before the down projection: ``silu(gate_proj(x)) * up_proj(x)``."""
    if node.gate is None:
        return f"{node.activation}({short['up']}(x))"
    return f"{node.activation}({short['gate']}(x)) * {short['up']}(x)"


def _formula(node: ExpertFFN, short: Mapping[str, str]) -> str:
    return f"{short['down']}({_hidden(node, short)})"


def _linears_lines(members: list[SiteRow], node: ExpertFFN) -> list[str]:
    """``gate model.layers.{0,1}.mlp.gate_proj (32 -> 64)``: each linear by role, path and widths."""
    lines = []
    for role, lin in _expert_linears(node).items():
        out, d_in = lin.weight.shape
        path = where([m.linears[role] for m in members]) if members[0].linears else "(path not known)"
        lines.append(f"{role:<4} {path} ({d_in} -> {out})")
    return lines


def _router(g: Graph, rid: str) -> Route:
    """The flat router of routing ``rid`` (through an expert-capacity limit)."""
    node = g.node(rid)
    return g.node(node.routing) if isinstance(node, CapacityLimit) else node  # type: ignore[return-value]


def _describe_block(g: Graph, node: ExpertFFN, short: Mapping[str, str]) -> str:
    route = _router(g, node.routing)
    assert isinstance(route, Route), f"%{node.routing} is not a flat router"
    linears = _expert_linears(node)
    adapted = {role: lin.a.shape[1] for role, lin in linears.items() if lin.a is not None}
    rank = next(iter(adapted.values()))  # one rank for the whole block (build_block_graph)
    text = (f"{route.experts} experts, {router_text(route)} per block; each expert is the frozen block with its "
            f"own LoRA of rank {rank} on {_and([short[role] for role in adapted])}")
    frozen = [short[role] for role in linears if role not in adapted]
    if frozen:
        text += f" ({_and(frozen)} without LoRA)"
    if node.dropout:
        text += (f"; LoRA dropout {node.dropout:g} in training on each LoRA's input (x for gate and up, the "
                 "expert's h for down; a mask per routed token and LoRA)")
    dora = [short[role] for role, lin in linears.items() if lin.magnitude is not None]
    if dora:
        text += (f"; DoRA experts (MixLoRA's use_dora): a magnitude per expert and output row on {_and(dora)}, "
                 "c ⊙ (W u + b + s B A u) with c = (‖W‖ + m) / ‖W + s B A‖")
    aux = [f"{n.kind} {n.weight:g}" for n in g.nodes if isinstance(n, AuxLoss)]
    return text + (f"; aux {', '.join(aux)}" if aux else "")


def _block_flops(plain: Graph, final: Graph) -> list[str]:
    """The whole routed block's forward FLOPs per token, then its split into the adapter's (router
    and expert LoRAs) and the frozen block GEMMs', each before and after the passes."""
    return [f"forward {flops_per_token(plain):,} plain -> {flops_per_token(final):,} optimised (the whole "
            "routed block)",
            f"adapter {adapter_flops_per_token(plain):,} plain -> {adapter_flops_per_token(final):,} optimised "
            "(router and expert LoRAs)",
            f"frozen block GEMMs {frozen_flops_per_token(plain):,} plain -> {frozen_flops_per_token(final):,} "
            "optimised"]


def _block_base_flops(final: Graph, short: Mapping[str, str]) -> str:
    weights = {p.name: p.shape for p in final.frozen}
    parts = [f"{short[role]} {2 * math.prod(weights[f'W_{role}']):,}" for role in ROLES if f"W_{role}" in weights]
    return (f"{base_flops_per_token(final):,} per token in the frozen block ({' + '.join(parts)}); the routed "
            "block replaces it (its frozen GEMMs are included above)")


def _block_kernel(g: Graph, short: Mapping[str, str]) -> str:
    """The routed block as lowered: the frozen GEMMs run once, what each selected expert runs on
    its tokens, where the down projection goes, and whether one fused op runs the experts."""
    node = block_node(g)
    assert node is not None, "not an FFN-block graph"
    route = _router(g, node.routing)
    k = route.k
    who = f"each token's top-{k} of {route.experts} experts" if k is not None else f"all {route.experts} experts"
    pairs = (("gate", node.gate, node.gate_base), ("up", node.up, node.up_base))
    inner = [(role, lin, base) for role, lin, base in pairs if lin is not None]
    once = [short[role] for role, _, base in inner if base is not None]
    own = [short[role] for role, _, base in inner if base is None]
    loras = [short[role] for role, lin, _ in inner if lin.a is not None]
    work = ([f"run frozen {_and(own)}"] if own else []) + ([f"add their LoRAs on {_and(loras)}"] if loras else [])
    steps = [f"frozen {_and(once)} once per token, shared by all experts"] if once else []
    steps.append(f"{who}, on their tokens only (slots grouped by expert), {' and '.join(work)}, "
                 f"h = {_hidden(node, short)}")
    steps.append(_down_text(g, node, short))
    if runs_as_routed_ffn(g, node):
        parts = [f"LoRAs on {_and(loras)}"] if loras else []
        lora_down = any(isinstance(u, ExpertLoRA) for u in g.users(node.id))
        parts += ["activation", "gated sum"] + (["LoRA on " + short["down"]] if lora_down else [])
        steps.append(f"the experts run as one fused op ({', '.join(parts)}): on CPU float tensors a compiled "
                     "kernel taking each token's slots in one pass over the row, elsewhere expert by expert "
                     "in cache")
    return "routed FFN block: " + "; ".join(steps)


def _down_text(g: Graph, node: ExpertFFN | ExpertHidden, short: Mapping[str, str]) -> str:
    down = short["down"]
    if isinstance(node, ExpertFFN):
        lora = " plus its LoRA" if node.down.a is not None else ""
        return f"each expert runs frozen {down}{lora} on its h, and the outputs are summed by gate"
    lora = any(isinstance(u, ExpertLoRA) for u in g.users(node.id))
    text = f"frozen {down} hoisted out of the experts: one GEMM on the gated sum of their h"
    return text + (f", plus each selected expert's LoRA on {down} of its own h" if lora else "")
