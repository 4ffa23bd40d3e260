"""The compiler: spec -> IR per site -> passes -> backend, injected into a model."""

from .build import SiteShape, build_graph
from .checkpoint import load, save
from .compile import as_spec, build_site_graphs, compile, count_parameters, structural_flexibility
from .explain import explain
from .handle import AdapterHandle
from .sites import ROLE_PATTERNS, ResolvedSite, resolve_sites

__all__ = ["compile", "explain", "save", "load", "as_spec", "build_graph", "build_site_graphs", "SiteShape",
           "AdapterHandle", "count_parameters", "structural_flexibility", "resolve_sites", "ResolvedSite",
           "ROLE_PATTERNS"]
