"""Draw one adapter site's IR graph as a PNG: nodes in dataflow layers from the input down,
coloured by what they do, with the site's parameters listed beside it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import networkx as nx
from matplotlib.figure import Figure

from ..interop.atomic import atomic_write
from ..ir import Graph, Rules, format_node, nodes

__all__ = ["draw_graph", "STYLE"]

STYLE: Rules[tuple[str, str]] = Rules("the graph plot", nodes.NODE_KINDS)
"""Node kind -> (fill colour, legend entry)."""
STYLE.add(("#E0E0E0", "input"), nodes.Input)
STYLE.add(("#C6DBEF", "linear (GEMM)"), nodes.Linear, nodes.SiblingLinear)
STYLE.add(("#F2F2F2", "slice / add"), nodes.Columns, nodes.Add)
STYLE.add(("#FDD0A2", "router"), nodes.Jitter, nodes.Route, nodes.TreeRoute, nodes.TreePathGates, nodes.TaskScores,
          nodes.LayerScalings)
STYLE.add(("#C7E9C0", "experts"), nodes.PoolMix, nodes.GroupedMix, nodes.BlockGate, nodes.OuterGate, nodes.TreeMix,
          nodes.TreePropagate, nodes.GateBias, nodes.ExpertFFN, nodes.ExpertHidden, nodes.ExpertSum, nodes.ExpertLoRA,
          nodes.CoreExperts, nodes.CoreMerge)
STYLE.add(("#FCBBA1", "aux loss"), nodes.AuxLoss, nodes.ZLoss)
STYLE.add(("#FDD0A2", "router"), nodes.Dropout, nodes.CapacityLimit)
STYLE.add(("#C7E9C0", "experts"), nodes.RaggedMix, nodes.Magnitude)
STYLE.add(("#C7E9C0", "experts"), nodes.KroneckerMix, nodes.TaskScale, nodes.PoolMagnitude)
STYLE.add(("#FDD0A2", "router"), nodes.TaskEmbed)
STYLE.add(("#FCBBA1", "aux loss"), nodes.TaskContrastive)


def _label(graph: Graph, node) -> str:
    text = format_node(node, graph.type(node.id)).split(" = ", 1)[1]
    lines = textwrap.wrap(text, width=30)
    return f"%{node.id}\n" + "\n".join(lines[:4] + (["..."] if len(lines) > 4 else []))


def _layout(graph: Graph) -> dict[str, tuple[float, float]]:
    """Layer = topological generation; nodes of a layer side by side, in graph order."""
    order = {n.id: i for i, n in enumerate(graph.nodes)}
    pos = {}
    for depth, layer in enumerate(nx.topological_generations(graph.dag())):
        layer = sorted(layer, key=order.__getitem__)
        for i, nid in enumerate(layer):
            pos[nid] = ((i - (len(layer) - 1) / 2) * 3.2, -depth * 1.6)
    return pos


def draw_graph(graph: Graph, path: str | Path, title: str | None = None) -> Path:
    """Write ``graph`` drawn as a PNG to ``path`` (atomically); returns the path."""
    pos = _layout(graph)
    xs = [p[0] for p in pos.values()]
    depth = -min(p[1] for p in pos.values()) / 1.6 + 1
    fig = Figure(figsize=(max(8.0, (max(xs) - min(xs)) * 1.1 + 8), max(4.0, depth * 1.35 + 1)))
    ax = fig.add_axes((0.0, 0.0, 0.7, 0.92))
    ax.axis("off")
    boxes = {}
    for n in graph.nodes:
        fill, _ = STYLE[n]
        edge = dict(ec="black", lw=2.2) if n.id == graph.output else dict(ec="#666666", lw=0.8)
        boxes[n.id] = ax.text(*pos[n.id], _label(graph, n), ha="center", va="center", fontsize=7.5,
                              family="monospace", bbox=dict(boxstyle="round,pad=0.4", fc=fill, **edge), zorder=3)
    for n in graph.nodes:
        for src in n.inputs():  # arrows clipped at the two boxes
            ax.annotate("", xy=pos[n.id], xytext=pos[src], zorder=4,
                        arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.2, shrinkA=1, shrinkB=1,
                                        patchA=boxes[src].get_bbox_patch(), patchB=boxes[n.id].get_bbox_patch()))
    ax.set_xlim(min(xs) - 2.2, max(xs) + 2.2)
    ax.set_ylim(-(depth - 1) * 1.6 - 0.9, 0.9)
    side = fig.add_axes((0.71, 0.0, 0.29, 0.92))
    side.axis("off")
    legend = sorted({STYLE[kind] for kind in STYLE.kinds}, key=lambda v: v[1])
    for i, (fill, name) in enumerate(legend):
        side.text(0.0, 1.0 - 0.045 * i, f"  {name}  ", fontsize=8, va="top",
                  bbox=dict(boxstyle="round", fc=fill, ec="#666666", lw=0.6))
    params = [f"{p.name} {tuple(p.shape)}" + ("" if p.trainable else " (buffer)" if p.buffer else " (frozen)")
              for p in graph.params]
    side.text(0.0, 1.0 - 0.045 * len(legend) - 0.03, "bold box: the site's output Δy\n\nparameters:\n  "
              + "\n  ".join(params), fontsize=7.5, va="top", family="monospace")
    fig.suptitle(title or f"adapter graph of {graph.label} (d_in={graph.d_in}, d_out={graph.d_out})",
                 fontsize=11, x=0.01, ha="left")
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path
STYLE.add(("#FCBBA1", "aux loss"), nodes.Preserve)
