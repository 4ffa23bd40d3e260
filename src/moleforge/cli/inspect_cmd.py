"""``moleforge inspect SPEC --model DIR``: where a spec goes in a model and what it costs,
without training anything: sites, parameters, FLOPs per token, Γ, and the IR."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import click

from .. import passes
from ..compiler import build_site_graphs, count_parameters, structural_flexibility
from ..compiler.flops import base_flops_per_token, flops_per_token
from ..compiler.sites import ResolvedSite
from ..ir import Graph, print_graph
from .common import friendly_errors, load_model, load_spec

__all__ = ["inspect_cmd", "group_sites"]


@dataclass
class SiteGroup:
    """Sites that share a module pattern and a graph shape (one per layer, usually)."""

    pattern: str
    sites: list[ResolvedSite]

    @property
    def first(self) -> ResolvedSite:
        return self.sites[0]

    def layers(self) -> str:
        found = [s.layer for s in self.sites if s.layer is not None]
        if not found:
            return "-"
        lo, hi = min(found), max(found)
        return f"{lo}-{hi}" if found == list(range(lo, hi + 1)) and lo != hi else ",".join(map(str, found))


def group_sites(sites: list[ResolvedSite]) -> list[SiteGroup]:
    """Group sites by (name with its layer number as ``*``, spec site, shape, overrides)."""
    groups: dict[tuple, SiteGroup] = {}
    for s in sites:
        pattern = re.sub(rf"\.{s.layer}\.", ".*.", s.name, count=1) if s.layer is not None else s.name
        key = (pattern, s.site_index, s.shape.d_in, s.shape.d_out, s.shape.experts, s.shape.rank)
        groups.setdefault(key, SiteGroup(pattern, [])).sites.append(s)
    return list(groups.values())


def _pipeline_names() -> str:
    names = [getattr(p, "__name__", repr(p)) for p in passes.DEFAULT_PIPELINE]
    return " -> ".join(names) if names else "no passes"


def _sites_table(groups: list[SiteGroup]) -> list[str]:
    width = max(len(g.pattern) for g in groups)
    lines = [f"  {'module':<{width}}  {'count':>5}  {'layers':>7}  {'d_in -> d_out':>13}  site"]
    for g in groups:
        s = g.first
        lines.append(f"  {g.pattern:<{width}}  {len(g.sites):>5}  {g.layers():>7}  "
                     f"{f'{s.shape.d_in} -> {s.shape.d_out}':>13}  sites[{s.site_index}] ({', '.join(s.roles)})")
    return lines


def _flops_table(groups: list[SiteGroup], graphs: dict[str, Graph]) -> list[str]:
    width = max(len(g.pattern) for g in groups)
    lines = [f"  {'module':<{width}}  {'base linear':>12}  {'adapter':>12}  {'adapter / base':>14}"]
    total_base = total_adapter = 0
    for g in groups:
        graph = graphs[g.first.name]
        base, adapter = base_flops_per_token(graph), flops_per_token(graph)
        total_base += base * len(g.sites)
        total_adapter += adapter * len(g.sites)
        lines.append(f"  {g.pattern:<{width}}  {base:>12,}  {adapter:>12,}  {adapter / base:>13.1%}")
    lines.append(f"  {'all sites':<{width}}  {total_base:>12,}  {total_adapter:>12,}  "
                 f"{total_adapter / max(1, total_base):>13.1%}")
    return lines


def _gamma(spec) -> str:
    gamma = structural_flexibility(spec)
    if isinstance(gamma, dict):
        return ", ".join(f"{k}: {v:,}" for k, v in gamma.items()) + "  (routing structures per token)"
    return f"{gamma:,}  (routing structures a token can take at one site)"


def _distinct_graphs(groups: list[SiteGroup]) -> list[tuple[str, list[str]]]:
    """One representative site per distinct graph (spec site and shape), with the patterns it stands for."""
    out: dict[tuple, tuple[str, list[str]]] = {}
    for g in groups:
        s = g.first
        key = (s.site_index, s.shape.d_in, s.shape.d_out, s.shape.experts, s.shape.rank)
        out.setdefault(key, (s.name, []))[1].append(g.pattern)
    return list(out.values())


@click.command("inspect")
@click.argument("spec")
@click.option("--model", "model_dir", required=True, metavar="DIR",
              help="A local HuggingFace model directory (config.json and weights, as save_pretrained writes).")
@click.option("--site", metavar="MODULE",
              help="Print (and draw) the IR of this module only. Default: one site of each kind.")
@click.option("--graph", "graph_png", metavar="PNG", type=click.Path(dir_okay=False),
              help="Draw the adapter graph of --site (or of the first site) to this PNG file.")
@friendly_errors
def inspect_cmd(spec: str, model_dir: str, site: str | None, graph_png: str | None) -> None:
    """Show where SPEC goes in a model and what it costs, without training.

    SPEC is a preset name (see `moleforge presets`) or a JSON spec file. Prints the
    adapted linears, the trainable parameters, the matrix-multiply FLOPs per token next
    to the frozen linears', the structural flexibility Γ, and the IR of each kind of
    site after the optimisation passes.

    \b
    Example:
      moleforge inspect smore --model runs/demo/base_model --graph smore.png
    """
    spec_obj = load_spec(spec)
    model = load_model(model_dir)
    sites, _, graphs = build_site_graphs(spec_obj, model)
    if site is not None and site not in graphs:
        sample = ", ".join(list(graphs)[:4])
        raise click.BadParameter(f"{site!r} is not an adapted module of this model; adapted: {sample}, ...",
                                 param_hint="--site")
    groups = group_sites(sites)
    n_model = sum(p.numel() for p in model.parameters())
    n_adapter = count_parameters(spec_obj, model)
    breakdown = count_parameters(spec_obj, model, breakdown=True)
    echo = click.echo
    echo(f"spec        {spec_obj.name}" + (f": {spec_obj.description}" if spec_obj.description else ""))
    echo(f"model       {type(model).__name__} from {model_dir}, {n_model:,} parameters")
    echo(f"Γ           {_gamma(spec_obj)}")
    echo(f"\nsites       {len(sites)} linears get the adapter")
    echo("\n".join(_sites_table(groups)))
    echo(f"\nparameters  {n_adapter:,} trainable ({n_adapter / n_model:.2%} of the model's {n_model:,})")
    parts = ", ".join(f"{k}={v:,}" for k, v in breakdown.items())  # type: ignore[union-attr]
    echo(textwrap.fill(parts, width=100, initial_indent="  ", subsequent_indent="  "))
    echo("\nFLOPs per token (matrix multiplies, 2 per multiply-add; per site of each kind)")
    echo("\n".join(_flops_table(groups, graphs)))
    shown = [(site, [site])] if site is not None else _distinct_graphs(groups)
    for name, patterns in shown:
        also = f"; the same graph for {', '.join(patterns)}" if len(patterns) > 1 else ""
        echo(f"\nIR of {name} after the passes ({_pipeline_names()}{also}):")
        echo(print_graph(graphs[name]))
    if graph_png is not None:
        from .graph_plot import draw_graph

        name = site or sites[0].name
        echo(f"\nadapter graph of {name} drawn to {draw_graph(graphs[name], graph_png)}")
