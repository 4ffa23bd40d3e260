"""Experts that come from trained PEFT LoRA folders (X-LoRA, MeteoRA, CAT, LoRA-Mixer).

A pool names its experts' folders in ``experts_from``, one per expert, in order. Each folder is a
PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) trained on the same base
model; its rank and alpha are read from the folder when the spec is planned on a model.

Each folder says whether its expert keeps training (``trainable``). A pool whose folders disagree
(a mixed pool) stores its experts in runs of consecutive experts with the same flag: the run of
experts ``[start, stop)`` is the tensor ``A_<start>_<stop>`` ``(stop - start, r, d_in)`` (and
``B_<start>_<stop>``), a parameter when the run trains and a buffer when it is frozen, so an
optimizer never sees a frozen expert (no update, no weight decay). The pool's ``A`` and ``B`` are
the runs concatenated in expert order.
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic import Field, PositiveInt

from .base import MAX_ALPHA, SpecModel

__all__ = ["LoRASource", "check_site_sources", "ExpertRun", "expert_runs"]


class LoRASource(SpecModel):
    """One expert of a pool read from a PEFT LoRA folder."""

    path: str = Field(min_length=1)
    """The folder (``adapter_config.json`` + ``adapter_model.safetensors``), absolute or relative
    to the working directory."""
    trainable: bool = False
    """Keep training the expert's A and B (``False``: frozen, never changed by training). The
    experts of one pool may differ: trainable ones are parameters, frozen ones buffers."""
    rank: PositiveInt | None = None
    """The rank the folder must have (``None``: whatever it has). Filled in when the spec is
    planned, so a saved adapter records the rank it was built with."""
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """The folder's ``lora_alpha`` (``None``: read from the folder); recorded like ``rank``."""


def check_site_sources(site) -> None:
    """A site whose pool has ``experts_from`` adapts single linears, with no per-layer overrides
    (the experts and ranks come from the folders)."""
    pool = site.adapter
    if not getattr(pool, "experts_from", None):
        return
    if site.scope != "linear":
        raise ValueError(f"adapter.experts_from: PEFT LoRA folders adapt single linears; set scope = 'linear' "
                         f"(got {site.scope!r})")
    if site.target.overrides:
        raise ValueError("target.overrides: the experts and ranks of a pool with experts_from come from its "
                         "folders; remove the overrides")


class ExpertRun(NamedTuple):
    """Experts ``[start, stop)`` of a mixed pool, stored as one tensor per factor."""

    start: int
    stop: int
    trainable: bool

    def name(self, factor: str) -> str:
        """The stored tensor of ``factor`` (``"A"`` or ``"B"``) for this run: ``A_0_2``."""
        return f"{factor}_{self.start}_{self.stop}"


def expert_runs(pool) -> list[ExpertRun]:
    """The runs of consecutive experts with the same ``trainable`` flag of a pool whose
    ``experts_from`` folders disagree; ``[]`` when they agree (or the pool names no folders): its
    experts are then stored whole, ``A`` and ``B``."""
    flags = [s.trainable for s in getattr(pool, "experts_from", [])]
    if len(set(flags)) < 2:
        return []
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append(ExpertRun(start, i, flags[start]))
            start = i
    return runs
