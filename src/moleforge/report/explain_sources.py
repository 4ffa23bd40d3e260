"""Where the experts of pools with ``experts_from`` came from, for ``explain`` and ``inspect``."""

from __future__ import annotations

from ..ir import Graph, TaskScores
from ..specs import AdapterSpec, ExpertPool
from ..specs.sources import expert_runs

__all__ = ["sources_lines", "task_text"]


def sources_lines(spec: AdapterSpec) -> list[str]:
    """One line per expert read from a PEFT LoRA folder: the site, the expert, the folder, its
    rank and alpha, and whether it trains (in a pool of trainable and frozen experts, also the
    tensors that hold it: a run's parameters or buffers)."""
    lines = []
    for i, site in enumerate(spec.sites):
        pool = site.adapter
        if not isinstance(pool, ExpertPool) or not pool.experts_from:
            continue
        runs = {j: run for run in expert_runs(pool) for j in range(run.start, run.stop)}
        for j, src in enumerate(pool.experts_from):
            rank = "ranks per module" if src.rank is None else f"rank {src.rank}"
            alpha = "" if src.alpha is None else f", alpha {src.alpha:g}"
            state = "trainable" if src.trainable else "frozen"
            held = f", in {runs[j].name('A')}/{runs[j].name('B')}" if j in runs else ""
            lines.append(f"  sites[{i}] expert {j}: PEFT LoRA {src.path} ({rank}{alpha}, {state}{held})")
    return lines


def task_text(g: Graph) -> str:
    """What a router reads of the task ids, when it reads them."""
    n = next((n for n in g.nodes if isinstance(n, TaskScores)), None)
    if n is None:
        return ""
    if n.table is None:
        return " of one-hot task ids (task t -> expert t)"
    return f" of {'token logits + ' if n.token_scores else ''}task embeddings ({n.tasks} tasks)"
