"""Runs a sequence of passes, verifying after each and naming the failing pass and
its predecessors when one breaks."""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import MoleforgeError, PassError
from ..ir import Graph, verify

__all__ = ["Pass", "run_pipeline", "PipelineTrace"]

Pass = Callable[[Graph], Graph]

PipelineTrace = list[tuple[str, Graph]]


def run_pipeline(graph: Graph, passes: Sequence[Pass], trace: PipelineTrace | None = None) -> Graph:
    """Apply ``passes`` in order. ``trace`` (if given) receives ``(pass name, graph after)``."""
    done: list[str] = []
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        try:
            out = verify(p(graph))
        except MoleforgeError as e:
            raise PassError(f"pass {name!r} failed on {graph.label!r} after {done or 'no passes'}: {e}") from e
        except Exception as e:  # noqa: BLE001 - wrap with the pass history
            raise PassError(f"pass {name!r} raised {type(e).__name__} on {graph.label!r} after "
                            f"{done or 'no passes'}: {e}") from e
        done.append(name)
        if trace is not None:
            trace.append((name, out))
        graph = out
    return graph
