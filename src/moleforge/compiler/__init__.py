"""The compiler: spec -> IR per site -> passes -> backend, injected into a model."""

from .build import SiteShape, build_graph
from .compile import as_spec, build_site_graphs, compile, count_parameters, structural_flexibility

__all__ = ["compile", "as_spec", "build_graph", "build_site_graphs", "SiteShape", "count_parameters",
           "structural_flexibility"]
