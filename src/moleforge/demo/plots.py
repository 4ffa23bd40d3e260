"""The demo's pictures (matplotlib, object API: no pyplot state, no display needed).

- ``loss_curves``: pretraining loss, fine-tuning loss of each method, exact match per task;
- ``expert_load``: fraction of routing slots each expert of each S'MoRE pool receives,
  per adapted linear (rows) and task (column blocks);
- ``routing_trees``: the tree one token is routed through, per task, and how often each
  (top expert, leaf expert) edge is used.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..data import IGNORE
from ..integrations.handle import AdapterHandle
from ..interop.atomic import atomic_write
from ..ir import TreeRouting
from .tasks import PRETRAIN_TASKS, TASKS

__all__ = ["TaskRouting", "record_task_routing", "loss_curves", "expert_load", "routing_trees", "short_name"]

def _first() -> str:
    return next(iter(TASKS))


_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


@dataclass
class TaskRouting:
    """Routing of one batch per task, at the tokens that predict an answer digit or ``<eos>``
    (the positions where the task matters): ``trees[task][module] = (indices, weights)``,
    per pool ``(T, F, f)``, leaves first; ``loads[task][module]`` is each pool's share of
    routing slots per expert, ``(s_l,)``, leaves first."""

    trees: dict[str, dict[str, tuple]] = field(default_factory=dict)
    loads: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)


def _answer_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B·S,)`` mask of positions whose next token is learned (``labels[s + 1] != -100``)."""
    labels = batch["labels"]  # (B, S)
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (B, S)
    return (nxt != IGNORE).reshape(-1)


def _slot_shares(indices: torch.Tensor, experts: int) -> torch.Tensor:
    counts = torch.bincount(indices.reshape(-1), minlength=experts).float()  # (s,)
    return counts / counts.sum().clamp_min(1)


@torch.no_grad()
def record_task_routing(handle: AdapterHandle, batches: dict[str, dict[str, torch.Tensor]]) -> TaskRouting:
    """Run each task's batch through the adapted model under ``handle.record_routing()`` and
    keep the tree routings at the answer tokens."""
    out = TaskRouting()
    handle.model.eval()
    for task, b in batches.items():
        with handle.record_routing() as log:
            handle.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        keep = _answer_tokens(b)
        trees = {m: v for m, routes in log.entries for v in routes.values() if isinstance(v, TreeRouting)}
        out.trees[task] = {m: (tuple(i[keep] for i in v.indices), tuple(w[keep] for w in v.weights))
                           for m, v in trees.items()}
        out.loads[task] = {m: [_slot_shares(i[keep], p.shape[-1]) for i, p in zip(v.indices, v.probs)]
                           for m, v in trees.items()}
    return out


def short_name(module: str) -> str:
    """``model.layers.2.mlp.up_proj`` -> ``layer 2 up_proj``."""
    m = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", module)
    return f"layer {m.group(1)} {m.group(2)}" if m else module


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], values[0] if values else 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def loss_curves(path: Path, pre, runs, base_scores) -> Path:
    """Three panels: pretraining loss; fine-tuning loss per method (raw and smoothed);
    exact match per task for the base model and each method."""
    fig = Figure(figsize=(15, 4.4))
    ax_pre, ax_ft, ax_acc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.3, 1.2]})
    ax_pre.plot(pre.loss, color="#555555", lw=0.8, alpha=0.35)
    ax_pre.plot(_smooth(pre.loss), color="#333333", lw=1.6)
    ax_pre.set(title="1. pretraining all weights on the tasks " + " ".join(PRETRAIN_TASKS), xlabel="step",
               ylabel="next-token loss")
    for i, r in enumerate(runs):
        c = _COLORS[i]
        ax_ft.plot(r.curve.loss, color=c, lw=0.8, alpha=0.3)
        ax_ft.plot(_smooth(r.curve.loss), color=c, lw=1.8,
                   label=f"{r.name}: {r.parameters:,} params, Γ = {r.gamma}")
    ax_ft.set(title="2. fine-tuning adapters on the new tasks " + " ".join(TASKS), xlabel="step",
              ylabel="loss on answer tokens")
    ax_ft.set_yscale("log")
    ax_ft.legend(frameon=False)
    names = ["base model"] + [r.name for r in runs]
    scores = [base_scores] + [r.scores for r in runs]
    width = 0.8 / len(names)
    for j, (name, sc) in enumerate(zip(names, scores)):
        xs = [t + (j - (len(names) - 1) / 2) * width for t in range(len(TASKS))]
        color = "#AAAAAA" if j == 0 else _COLORS[j - 1]
        values = [100 * sc[t].exact for t in TASKS]
        bars = ax_acc.bar(xs, values, width=width, color=color, label=name)
        ax_acc.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax_acc.set_xticks(range(len(TASKS)), list(TASKS))
    ax_acc.set(title="3. prompts answered exactly right", xlabel="task", ylabel="%", ylim=(0, 118))
    ax_acc.legend(frameon=False, fontsize=8, loc="upper center", ncol=len(names))
    for ax in (ax_pre, ax_ft, ax_acc):
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def expert_load(path: Path, routing: TaskRouting) -> Path:
    """Heatmaps, one per pool: rows = adapted linears, column blocks = tasks, one column per expert."""
    modules = list(routing.loads[_first()])
    pools = len(routing.loads[_first()][modules[0]])
    fig = Figure(figsize=(15, 1.2 + 0.42 * len(modules) * pools))
    axes = fig.subplots(pools, 1, squeeze=False)[:, 0]
    for row, pool in enumerate(reversed(range(pools))):
        ax = axes[row]
        E = routing.loads[_first()][modules[0]][pool].numel()
        grid = torch.stack([torch.cat([routing.loads[t][m][pool] for t in TASKS]) for m in modules])  # (M, tasks*E)
        uniform = 1.0 / E
        span = max(uniform, float((grid - uniform).abs().max()))
        im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=uniform - span, vmax=uniform + span, aspect="auto")
        for (i, j), v in zip(((i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])), grid.flatten()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v - uniform) > 0.7 * span else "black")
        for k in range(1, len(TASKS)):
            ax.axvline(k * E - 0.5, color="black", lw=2)
        ax.set_xticks(range(len(TASKS) * E), [f"e{e}" for _ in TASKS for e in range(E)], fontsize=8)
        ax.set_yticks(range(len(modules)), [short_name(m) for m in modules], fontsize=8)
        for k, t in enumerate(TASKS):
            ax.text(k * E + (E - 1) / 2, -0.75, t, ha="center", va="bottom", fontsize=10, weight="bold")
        level = "top pool: the experts each token picks first" if pool == pools - 1 else \
            "leaf pool: the children each chosen parent picks" if pool == 0 else f"pool {pool}"
        ax.set_title(f"S'MoRE {level}\n", fontsize=10, loc="left")
        fig.colorbar(im, ax=ax, fraction=0.015, pad=0.01, label=f"share of slots (white = {uniform:.2f})")
    fig.suptitle("S'MoRE expert load per layer and task: share of routing slots each expert gets at the answer "
                 "tokens of the task's ten prompts (red: more than uniform, blue: less)",
                 fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    return _save(fig, path)


def _most_task_dependent(routing: TaskRouting) -> str:
    """The module whose top-pool load differs most between tasks (L1 distance to the mean)."""
    def spread(m: str) -> float:
        loads = torch.stack([routing.loads[t][m][-1] for t in TASKS])  # (tasks, E)
        return float((loads - loads.mean(0)).abs().sum())
    return max(routing.loads[_first()], key=spread)


def _draw_tree(ax, top_idx, top_w, leaf_idx, leaf_w) -> None:
    """Root, its chosen top experts, and each one's chosen leaves; edge width = gate weight."""
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.12, 1.12)
    ax.axis("off")
    f1, f0 = len(top_idx), leaf_idx.shape[-1]
    root = (0.5, 1.0)
    leaves_n = f1 * f0
    for p in range(f1):
        mid = ((p + 0.5) / f1, 0.55)
        _edge(ax, root, mid, float(top_w[p]))
        for j in range(f0):
            leaf = ((p * f0 + j + 0.5) / leaves_n, 0.08)
            _edge(ax, mid, leaf, float(leaf_w[p, j]))
            _node(ax, leaf, int(leaf_idx[p, j]))
        _node(ax, mid, int(top_idx[p]))
    ax.text(*root, "token", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round", fc="white", ec="#333333"))


def _edge(ax, a, b, w: float) -> None:
    ax.plot([a[0], b[0]], [a[1], b[1]], color="#333333", lw=0.5 + 6 * w, alpha=0.7, zorder=1)
    ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, f"{w:.2f}", fontsize=7, ha="center", va="center",
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"), zorder=3)


def _node(ax, xy, expert: int) -> None:
    ax.scatter([xy[0]], [xy[1]], s=520, color=_COLORS[expert % len(_COLORS)], zorder=2)
    ax.text(xy[0], xy[1], f"e{expert}", ha="center", va="center", color="white", fontsize=9, weight="bold", zorder=4)


def _tree_usage(top_i, top_w, leaf_i, leaf_w):
    """The most used tree over tokens: ``(top experts (f1,), mean weights, leaf experts (f1, f0),
    mean weights, tokens using it)``; a tree is the ordered choice at every node."""
    keys = [(tuple(top_i[t, 0].tolist()), tuple(map(tuple, leaf_i[t].tolist()))) for t in range(top_i.shape[0])]
    key, count = Counter(keys).most_common(1)[0]
    rows = torch.tensor([k == key for k in keys])  # (T,)
    return (top_i[rows][0, 0], top_w[rows][:, 0].mean(0), leaf_i[rows][0], leaf_w[rows].mean(0), count)


def routing_trees(path: Path, routing: TaskRouting) -> Path:
    """Top row: each task's most used routing tree at one site (weights averaged over the
    tokens that use it). Bottom row: share of (top expert, leaf expert) edges over all tokens."""
    module = _most_task_dependent(routing)
    fig = Figure(figsize=(15, 7.6))
    axes = fig.subplots(2, len(TASKS), gridspec_kw={"height_ratios": [1.15, 1]})
    for k, task in enumerate(TASKS):
        (leaf_i, top_i), (leaf_w, top_w) = routing.trees[task][module]
        T = top_i.shape[0]
        top, tw, leaf, lw, count = _tree_usage(top_i, top_w, leaf_i, leaf_w)
        _draw_tree(axes[0, k], top, tw, leaf, lw)
        axes[0, k].set_title(f"{task}: most used tree\n({count} of {T} answer tokens)", fontsize=10)
        E_top, E_leaf = routing.loads[task][module][-1].numel(), routing.loads[task][module][0].numel()
        edges = torch.zeros(E_top, E_leaf)
        parents = top_i[:, 0, :, None].expand_as(leaf_i)  # (T, f1, f0)
        edges.index_put_((parents.reshape(-1), leaf_i.reshape(-1)), torch.ones(parents.numel()), accumulate=True)
        edges /= edges.sum()
        ax = axes[1, k]
        ax.imshow(edges.numpy(), cmap="Blues", vmin=0, vmax=max(0.15, float(edges.max())))
        for i in range(E_top):
            for j in range(E_leaf):
                ax.text(j, i, f"{edges[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(E_leaf), [f"e{j}" for j in range(E_leaf)])
        ax.set_yticks(range(E_top), [f"e{i}" for i in range(E_top)])
        ax.set(xlabel="leaf-pool expert", ylabel="top-pool expert" if k == 0 else None)
        ax.set_title(f"{task}: share of parent -> child edges", fontsize=9)
    fig.suptitle(f"S'MoRE routing trees at {short_name(module)} (the site whose routing depends most on the task); "
                 "edge labels: gate weights", fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    return _save(fig, path)
