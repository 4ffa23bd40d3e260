"""``--experts DIR ...``: compose PEFT LoRA folders with a spec (``moleforge train xlora --experts
a/ b/ c/``): every pool of the spec takes the folders as its experts, on the modules every folder
adapts."""

from __future__ import annotations

import re
from typing import Sequence

import click

from ..interop.peft_format import read_peft_lora
from ..specs import AdapterSpec, ExpertPool

__all__ = ["experts_option", "with_experts"]

experts_option = click.option(
    "--experts", "experts", multiple=True, metavar="DIR",
    help="PEFT LoRA folders to compose (repeat --experts, or give one comma-separated list): every pool of SPEC "
         "takes the folders as its experts (frozen), on the modules they all adapt.")


def _split(values: Sequence[str]) -> list[str]:
    return [p for v in values for p in v.replace(",", " ").split()]


def with_experts(spec: AdapterSpec, values: Sequence[str]) -> AdapterSpec:
    """``spec`` with every pool's ``experts_from`` set to the folders and its target set to the
    modules all of them adapt; ``spec`` itself when no folder is given.

    Raises:
        click.UsageError: the spec has no pool, or the folders share no module.
    """
    paths = _split(values)
    if not paths:
        return spec
    pools = [i for i, s in enumerate(spec.sites) if isinstance(s.adapter, ExpertPool)]
    if not pools:
        raise click.UsageError(f"--experts: spec {spec.name!r} has no pool to take the folders as experts; "
                               "use a pool preset (xlora, lora_soups, meteora, lora_mixer)")
    common = set.intersection(*(set(read_peft_lora(p).modules) for p in paths))
    if not common:
        raise click.UsageError("--experts: the folders adapt no module in common: " + ", ".join(paths))
    sites = [s.model_dump() for s in spec.sites]
    for i in pools:
        adapter = {k: v for k, v in sites[i]["adapter"].items() if k not in ("experts", "rank", "alpha", "scaling",
                                                                           "frozen_experts")}
        adapter["experts_from"] = [{"path": p} for p in paths]
        sites[i].update(adapter=adapter, scope="linear",
                        target={"modules": [re.escape(m) + "$" for m in sorted(common)]})
    return AdapterSpec.model_validate({**spec.model_dump(), "sites": sites})
