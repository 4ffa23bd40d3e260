"""Routing statistics of recorded forwards: expert load and gate entropy per site."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir import TreeRouting

__all__ = ["RoutingLog"]


@dataclass
class RoutingLog:
    """What ``handle.record_routing()`` collected: ``entries`` of ``(module, {router id: routing})``.

    A flat routing is a :class:`~moleforge.ir.Routing` ``(gates (T, E), probs (T, E), index (T, k) |
    None, dropped (T, k) | None)`` (a capacity-limited routing is logged beside the routing it limits;
    its load counts the kept slots); a tree routing a :class:`~moleforge.ir.TreeRouting`
    ``(indices, weights, probs, gate)``, tuples over pools of ``(T, F_{l+1}, f_l)`` / ``(T, F, s_l)``.
    ``T`` counts the real tokens of a padded batch only (the model call's ``attention_mask``).
    """

    entries: list = field(default_factory=list)

    def expert_load(self) -> dict[str, list[torch.Tensor]]:
        """``{module: [load per router or tree pool]}``: the fraction of routing slots each expert
        received (sums to 1), over every recorded forward."""
        acc: dict[str, list[torch.Tensor]] = {}
        for module, routes in self.entries:
            loads = []
            for value in routes.values():
                loads.extend(_loads(value))
            prev = acc.get(module)
            acc[module] = loads if prev is None else [a + b for a, b in zip(prev, loads)]
        return {m: [v / v.sum().clamp_min(1e-12) for v in loads] for m, loads in acc.items()}

    def dropped(self) -> dict[str, int]:
        """``{module: (token, slot) assignments over their expert's capacity}`` over every recorded
        forward: the tokens that passed an expert by (``capacity_factor``); 0 for modules without
        capacity."""
        out: dict[str, int] = {}
        for module, routes in self.entries:
            n = sum(int(v.dropped.sum()) for v in routes.values() if getattr(v, "dropped", None) is not None)
            out[module] = out.get(module, 0) + n
        return out

    def entropy(self) -> dict[str, list[float]]:
        """``{module: [mean entropy (nats) of the router probabilities per router or pool]}``."""
        acc: dict[str, list[list[float]]] = {}
        for module, routes in self.entries:
            ent = []
            for value in routes.values():
                probs = value.probs if isinstance(value, TreeRouting) else (value.probs,)
                for p in probs:
                    p = p.reshape(-1, p.shape[-1]).float()
                    ent.append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
            acc.setdefault(module, []).append(ent)
        return {m: [sum(col) / len(col) for col in zip(*rows)] for m, rows in acc.items()}


def _loads(value) -> list[torch.Tensor]:
    if isinstance(value, TreeRouting):  # per pool counts of selected experts, weighted by nothing
        return [torch.bincount(idx.reshape(-1), minlength=p.shape[-1]).float()
                for idx, p in zip(value.indices, value.probs)]
    gates = value.gates
    if value.index is None:
        return [(gates > 0).float().sum(0)]
    index = value.index if value.dropped is None else value.index[~value.dropped]  # capacity: the kept slots
    return [torch.bincount(index.reshape(-1), minlength=gates.shape[-1]).float()]
