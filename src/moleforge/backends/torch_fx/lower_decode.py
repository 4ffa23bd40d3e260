"""The decode form of a generated module (``runtime/ops_decode.PoolDecode``), read off the site's
plain IR when it is one routed LoRA pool and nothing else:

    %logits = linear %x W=router_w (no bias)
    %route  = route %logits softmax_topk(k, renorm, tau) | dense_softmax(tau)
    %src    = %x, or dropout %x (identity in evaluation, where the form runs)
    %mix    = pool_mix %src by %route A B scale
    aux losses on %route (not computed without autograd in evaluation)
    return %mix

A plain LoRA has none: its generated forward (two GEMMs) is as fast at decode sizes.

The plain IR is the semantics (the passes only re-form it), so the form computes it from the
same stored tensors whatever the passes made of the graph. Any other graph has no decode form.
"""

from __future__ import annotations

from ...ir import Graph, ParamRef, nodes
from ..runtime.ops_decode import PoolDecode

__all__ = ["pool_decode_form"]


def _gate(g) -> tuple[str, int, bool, float] | None:
    """``(gate code name, k, renormalize, temperature)`` of a gate the kernel takes."""
    if type(g) is nodes.SoftmaxTopK:
        return "softmax_topk", g.k, g.renormalize, g.temperature
    if type(g) is nodes.DenseSoftmax:
        return "dense_softmax", 0, False, g.temperature
    return None


def _input(plain: Graph, nid: str) -> nodes.Input | None:
    """The site's input behind ``nid``: the input itself or its dropout (identity in evaluation)."""
    src = plain.node(nid)
    if type(src) is nodes.Dropout:
        src = plain.node(src.src)
    return src if type(src) is nodes.Input else None


def pool_decode_form(plain: Graph) -> PoolDecode | None:
    """The decode form of ``plain`` (a site's IR before the passes), or ``None``."""
    mix = plain.node(plain.output)
    if type(mix) is not nodes.PoolMix or not isinstance(mix.a, ParamRef) or not isinstance(mix.b, ParamRef):
        return None
    route, src = plain.node(mix.routing), _input(plain, mix.src)
    if type(route) is not nodes.Route or src is None:
        return None
    logits = plain.node(route.src)
    gate = _gate(route.gate)
    if type(logits) is not nodes.Linear or logits.src != src.id or gate is None or logits.scale != 1.0:
        return None
    if not isinstance(logits.weight, ParamRef) or logits.bias is not None:
        return None
    used = {plain.output, mix.routing, mix.src, route.src, src.id, *plain.aux}
    if any(n.id not in used for n in plain.nodes) or plain.frozen:
        return None
    if any(not isinstance(plain.node(a), nodes.AuxLoss) for a in plain.aux):
        return None
    name, k, renormalize, temperature = gate
    return PoolDecode(router_w=logits.weight.name, a=mix.a.name, b=mix.b.name, gate=name, k=k,
                      renormalize=renormalize, temperature=temperature, scale=mix.scale)
