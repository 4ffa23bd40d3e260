"""Optimisation passes: pure ``Graph -> Graph`` functions, one per file, each an exact
identity stated in its docstring (METHODS.md §20)."""

from .pipeline import Pass, PipelineTrace, run_pipeline

DEFAULT_PIPELINE: tuple[Pass, ...] = ()

__all__ = ["DEFAULT_PIPELINE", "Pass", "PipelineTrace", "run_pipeline"]
