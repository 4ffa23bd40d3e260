"""``moleforge inspect SPEC --model DIR``: where a spec goes in a model and what it costs,
without training anything: sites (adapted linears and routed FFN blocks), parameters, FLOPs per
token, Γ, and the IR."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Sequence

import click

from .. import passes
from ..compiler import Plan, count_parameters, plan, structural_flexibility
from ..integrations.ffn_blocks import ResolvedBlock
from ..integrations.sites import ResolvedSite
from ..ir import Graph, print_graph
from ..report.explain import site_row
from ..report.explain_blocks import block_fields
from ..report.explain_sources import sources_lines
from ..report.flops import adapter_flops_per_token, base_flops_per_token
from ..report.structure import format_gamma
from ..specs import AdapterSpec
from .common import friendly_errors, load_model, load_spec
from .experts import experts_option, with_experts

__all__ = ["inspect_cmd", "group_sites"]


@dataclass
class SiteGroup:
    """Sites that share a module pattern and a graph shape (one per layer, usually): adapted
    linears, or routed FFN blocks."""

    pattern: str
    sites: list[ResolvedSite] | list[ResolvedBlock]

    @property
    def first(self) -> ResolvedSite | ResolvedBlock:
        return self.sites[0]

    @property
    def is_block(self) -> bool:
        return isinstance(self.first, ResolvedBlock)

    def layers(self) -> str:
        found = [s.layer for s in self.sites if s.layer is not None]
        if not found:
            return "-"
        lo, hi = min(found), max(found)
        return f"{lo}-{hi}" if found == list(range(lo, hi + 1)) and lo != hi else ",".join(map(str, found))


def group_sites(sites: Sequence[ResolvedSite] | Sequence[ResolvedBlock]) -> list[SiteGroup]:
    """Group sites (or blocks) by (name with its layer number as ``*``, spec site, shape, overrides)."""
    groups: dict[tuple, SiteGroup] = {}
    for s in sites:
        pattern = re.sub(rf"\.{s.layer}\.", ".*.", s.name, count=1) if s.layer is not None else s.name
        key = (pattern, s.site_index, s.shape.d_in, s.shape.d_out, s.shape.experts, s.shape.rank)
        groups.setdefault(key, SiteGroup(pattern, [])).sites.append(s)
    return list(groups.values())


def _pipeline_names(pipeline: Sequence[passes.Pass]) -> str:
    names = [getattr(p, "__name__", repr(p)) for p in pipeline]
    return " -> ".join(names) if names else "no passes"


def _sites_line(n_linears: int, n_blocks: int) -> str:
    if not n_blocks:
        return f"{n_linears} linears get the adapter"
    blocks = f"{n_blocks} FFN blocks" if n_blocks > 1 else "1 FFN block"
    return f"{n_linears} linears and {blocks} get the adapter" if n_linears else f"{blocks} get the adapter"


def _sites_table(groups: list[SiteGroup]) -> list[str]:
    width = max(len(g.pattern) for g in groups)
    lines = [f"  {'module':<{width}}  {'count':>5}  {'layers':>7}  {'d_in -> d_out':>13}  site"]
    for g in groups:
        s = g.first
        roles = ("ffn_block: " if g.is_block else "") + ", ".join(s.roles)
        lines.append(f"  {g.pattern:<{width}}  {len(g.sites):>5}  {g.layers():>7}  "
                     f"{f'{s.shape.d_in} -> {s.shape.d_out}':>13}  sites[{s.site_index}] ({roles})")
    return lines


def _flops_table(groups: list[SiteGroup], graphs: dict[str, Graph]) -> list[str]:
    """Per group, the frozen module's FLOPs and the adapter's (an FFN block's router and expert
    LoRAs: the routed block runs both)."""
    width = max(len(g.pattern) for g in groups)
    lines = [f"  {'module':<{width}}  {'frozen base':>12}  {'adapter':>12}  {'adapter / base':>14}"]
    total_base = total_adapter = 0
    for g in groups:
        graph = graphs[g.first.name]
        base, adapter = base_flops_per_token(graph), adapter_flops_per_token(graph)
        total_base += base * len(g.sites)
        total_adapter += adapter * len(g.sites)
        lines.append(f"  {g.pattern:<{width}}  {base:>12,}  {adapter:>12,}  {adapter / base:>13.1%}")
    lines.append(f"  {'all sites':<{width}}  {total_base:>12,}  {total_adapter:>12,}  "
                 f"{total_adapter / max(1, total_base):>13.1%}")
    return lines


def _gamma(spec: AdapterSpec) -> str:
    gamma = structural_flexibility(spec)
    if not isinstance(gamma, dict):
        return f"{format_gamma(gamma)}  (routing structures a token can take at one site)"

    def label(key: str) -> str:
        site = spec.sites[int(re.match(r"sites\[(\d+)\]", key)[1])]  # type: ignore[index]
        return f"{key} (ffn_block)" if site.scope == "ffn_block" else key

    return ", ".join(f"{label(k)}: {format_gamma(v)}" for k, v in gamma.items()) + "  (routing structures per token)"


def _distinct_graphs(groups: list[SiteGroup]) -> list[tuple[str, list[str]]]:
    """One representative site per distinct graph (spec site and shape), with the patterns it stands for."""
    out: dict[tuple, tuple[str, list[str]]] = {}
    for g in groups:
        s = g.first
        key = (g.is_block, s.site_index, s.shape.d_in, s.shape.d_out, s.shape.experts, s.shape.rank)
        out.setdefault(key, (s.name, []))[1].append(g.pattern)
    return list(out.values())


def _block_lines(groups: list[SiteGroup], planned: Plan) -> list[str]:
    """Each group of routed FFN blocks as ``mf.explain`` describes it (costs are in the tables)."""
    lines = []
    for g in groups:
        lines += block_fields([site_row(planned.site(b.name)) for b in g.sites], costs=False)
    return lines


@click.command("inspect")
@click.argument("spec")
@click.option("--model", "model_dir", required=True, metavar="DIR",
              help="A local HuggingFace model directory (config.json and weights, as save_pretrained writes).")
@click.option("--site", metavar="MODULE",
              help="Print (and draw) the IR of this module only. Default: one site of each kind.")
@click.option("--graph", "graph_png", metavar="PNG", type=click.Path(dir_okay=False),
              help="Draw the adapter graph of --site (or of the first site) to this PNG file.")
@experts_option
@friendly_errors
def inspect_cmd(spec: str, model_dir: str, site: str | None, graph_png: str | None,
                experts: tuple[str, ...] = ()) -> None:
    """Show where SPEC goes in a model and what it costs, without training.

    SPEC is a preset name (see `moleforge presets`) or a JSON spec file. Prints the
    adapted linears and the FFN blocks routed experts replace (with the linears and
    activation recognised in each), the trainable parameters, the matrix-multiply FLOPs
    per token next to the frozen modules', the structural flexibility Γ, and the IR of
    each kind of site after the optimisation passes.

    \b
    Example:
      moleforge inspect smore --model runs/demo/base_model --graph smore.png
    """
    model = load_model(model_dir)
    planned = plan(with_experts(load_spec(spec), experts), model)
    spec_obj = planned.spec
    sites = [s.resolved for s in planned.sites if s.scope == "linear"]
    blocks = [s.resolved for s in planned.sites if s.scope == "ffn_block"]
    graphs = planned.graphs
    if site is not None and site not in graphs:
        sample = ", ".join(list(graphs)[:4])
        raise click.BadParameter(f"{site!r} is not an adapted module of this model; adapted: {sample}, ...",
                                 param_hint="--site")
    groups = group_sites(sites) + group_sites(blocks)
    block_groups = [g for g in groups if g.is_block]
    n_model = sum(p.numel() for p in model.parameters())
    n_adapter = count_parameters(spec_obj, model)
    breakdown = count_parameters(spec_obj, model, breakdown=True)
    echo = click.echo
    echo(f"spec        {spec_obj.name}" + (f": {spec_obj.description}" if spec_obj.description else ""))
    echo(f"model       {type(model).__name__} from {model_dir}, {n_model:,} parameters")
    echo(f"Γ           {_gamma(spec_obj)}")
    echo(f"\nsites       {_sites_line(len(sites), len(blocks))}")
    echo("\n".join(_sites_table(groups)))
    if sources_lines(spec_obj):
        echo("\nexperts     from PEFT LoRA folders")
        echo("\n".join(sources_lines(spec_obj)))
    if block_groups:
        echo("\nFFN blocks  routed experts replace these modules (scope ffn_block)")
        echo("\n".join(_block_lines(block_groups, planned)))
    echo(f"\nparameters  {n_adapter:,} trainable ({n_adapter / n_model:.2%} of the model's {n_model:,})")
    parts = ", ".join(f"{k}={v:,}" for k, v in breakdown.items())  # type: ignore[union-attr]
    echo(textwrap.fill(parts, width=100, initial_indent="  ", subsequent_indent="  "))
    echo("\nFLOPs per token (matrix multiplies, 2 per multiply-add; per site of each kind)")
    echo("\n".join(_flops_table(groups, graphs)))
    if block_groups:
        echo("  (FFN blocks: the routed block runs the block's frozen GEMMs once per token, plus the adapter)")
    shown = [(site, [site])] if site is not None else _distinct_graphs(groups)
    for name, patterns in shown:
        also = f"; the same graph for {', '.join(patterns)}" if len(patterns) > 1 else ""
        echo(f"\nIR of {name} after the passes ({_pipeline_names(planned.pipeline)}{also}):")
        echo(print_graph(graphs[name]))
    if graph_png is not None:
        from .graph_plot import draw_graph

        name = site or next(iter(graphs))
        echo(f"\nadapter graph of {name} drawn to {draw_graph(graphs[name], graph_png)}")
