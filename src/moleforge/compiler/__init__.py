"""The compiler: spec -> plan (sites, IR per site, passes) -> lowered sites injected into a model."""

from .build import SiteShape, build_block_graph, build_graph
from .compile import build_site_graphs, compile, count_parameters, explain, structural_flexibility
from .planner import Plan, PlannedSite, as_spec, plan

__all__ = ["compile", "explain", "plan", "Plan", "PlannedSite", "as_spec", "build_graph", "build_block_graph",
           "build_site_graphs", "SiteShape", "count_parameters", "structural_flexibility"]
