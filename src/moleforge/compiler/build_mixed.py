"""The factors of a pool whose experts train or stay frozen one by one (``experts_from`` folders
with different ``trainable`` flags, ``specs/sources.py``), and the ``preserve`` loss that keeps
the trainable ones near their folders (``specs/preserve.py``).

Each run of consecutive experts with the same flag is one stored tensor per factor,
``A_<start>_<stop> (n, r, d_in)`` and ``B_<start>_<stop> (n, d_out, r)``: a parameter when the run
trains, a buffer when it is frozen (so no optimizer holds it: no update, no weight decay). The
pool reads ``A = cat(A_runs)``, ``B = cat(B_runs)`` along the expert axis, in expert order: the
same ``(E, r, d_in)`` and ``(E, d_out, r)`` as a pool stored whole, so every pass and backend that
reads parameter expressions treats it as any pool.
"""

from __future__ import annotations

from ..ir import Concat, ParamExpr, ParamRef, Preserve
from ..specs import PreserveLoss
from ..specs.sources import ExpertRun

__all__ = ["mixed_factors", "preserve_node"]


def mixed_factors(b, runs: list[ExpertRun], r: int, d_in: int, d_out: int) -> tuple[ParamExpr, ParamExpr]:
    """``(A, B)``: the runs of ``b`` (a graph builder) declared and concatenated in expert order."""
    a_parts, b_parts = [], []
    for run in runs:
        n, learn = run.stop - run.start, run.trainable
        a_parts.append(b.param(run.name("A"), (n, r, d_in), "kaiming", fan_in=d_in, trainable=learn,
                               buffer=not learn))
        b_parts.append(b.param(run.name("B"), (n, d_out, r), "up", trainable=learn, buffer=not learn))
    return Concat(tuple(a_parts), 0), Concat(tuple(b_parts), 0)


def preserve_node(b, aux: PreserveLoss, nid: str, origin: str) -> Preserve:
    """LoRA-Mixer's ``L_preserve`` over the pool's trainable expert factors (``A`` and ``B``, or their
    trainable runs ``A_<start>_<stop>``), each with a buffer ``<name>_start`` that keeps its starting
    value (the folders' tensors, which ``compiler/sources.py`` gives it)."""
    learned = [d for d in b.params if d.trainable and d.name.split("_")[0] in ("A", "B")]
    pairs = tuple((ParamRef(d.name, d.shape), b.param(f"{d.name}_start", d.shape, "zero", trainable=False,
                                                      buffer=True)) for d in learned)
    return Preserve(id=nid, pairs=pairs, weight=aux.weight, origin=origin)
