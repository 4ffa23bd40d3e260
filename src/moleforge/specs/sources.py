"""Experts that come from trained PEFT LoRA folders (X-LoRA, MeteoRA, CAT, LoRA-Mixer).

A pool names its experts' folders in ``experts_from``, one per expert, in order. Each folder is a
PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) trained on the same base
model; its rank and alpha are read from the folder when the spec is planned on a model.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from .base import MAX_ALPHA, SpecModel

__all__ = ["LoRASource", "check_site_sources"]


class LoRASource(SpecModel):
    """One expert of a pool read from a PEFT LoRA folder."""

    path: str = Field(min_length=1)
    """The folder (``adapter_config.json`` + ``adapter_model.safetensors``), absolute or relative
    to the working directory."""
    trainable: bool = False
    """Keep training the expert's A and B (``False``: frozen, only the router learns). The experts
    of one pool are all frozen or all trainable."""
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
