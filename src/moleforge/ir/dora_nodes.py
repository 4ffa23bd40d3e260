"""DoRA magnitudes on the experts of a pool (``specs/pool_magnitude.py`` gives the definition)."""

from __future__ import annotations

from dataclasses import dataclass

from .basics_nodes import _DoRAFields
from .kinds import operand

__all__ = ["PoolMagnitude"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolMagnitude(_DoRAFields):
    """A pool of DoRA experts: ``Δy = Σ_i g_i [(c_i - 1) ⊙ (x Wᵀ) + c_i ⊙ scale (x A_iᵀ) B_iᵀ]``,
    ``c_i = (‖W‖ + magnitude_i) / ‖W + scale B_i A_i‖`` (row norms over ``d_in``; the denominator
    passes no gradient). ``src = x`` (the dropped input in training), ``a (E|1, r, d_in)``, ``b (E|1,
    d_out, r)`` (a factor all experts share has one, as in :class:`PoolMix`: HydraLoRA's shared
    ``A``), ``magnitude (E, d_out)``, ``weight`` the frozen ``W (d_out, d_in)`` (a frozen input
    of the graph): ``(T, d_in) -> (T, d_out)``."""

    routing: str = operand()
