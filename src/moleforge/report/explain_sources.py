"""Where the experts of pools with ``experts_from`` came from, for ``explain`` and ``inspect``."""

from __future__ import annotations

from ..specs import AdapterSpec, ExpertPool

__all__ = ["sources_lines"]


def sources_lines(spec: AdapterSpec) -> list[str]:
    """One line per expert read from a PEFT LoRA folder: the site, the expert, the folder, its
    rank and alpha, and whether it trains."""
    lines = []
    for i, site in enumerate(spec.sites):
        pool = site.adapter
        if not isinstance(pool, ExpertPool) or not pool.experts_from:
            continue
        for j, src in enumerate(pool.experts_from):
            rank = "ranks per module" if src.rank is None else f"rank {src.rank}"
            alpha = "" if src.alpha is None else f", alpha {src.alpha:g}"
            state = "trainable" if src.trainable else "frozen"
            lines.append(f"  sites[{i}] expert {j}: PEFT LoRA {src.path} ({rank}{alpha}, {state})")
    return lines
