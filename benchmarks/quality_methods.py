"""The methods of the quality benchmark: each a preset, placed on the top layers, with one size
knob that brings its trainable-parameter count to the budget.

A method keeps its paper's targets and everything else of its preset; the knob is its rank
(per expert, per level, or of the whole partition) or, for FlyLoRA, its number of rank-1
experts. Scales follow the knob the way the preset sets them (``alpha = 2·rank`` where the
preset has ``alpha = 16`` at rank 8), so a larger rank does not change the update's scale.
"""

from __future__ import annotations

import copy
from typing import Callable

import moleforge as mf

__all__ = ["METHODS", "matched_spec"]


def _sites(spec: dict):
    return [s["adapter"] for s in spec["sites"]]


def _rank(alpha_per_rank: float | None) -> Callable[[dict, int], None]:
    def set_rank(spec: dict, r: int) -> None:
        for a in _sites(spec):
            a["rank"] = r
            if alpha_per_rank is not None:
                a["alpha"] = alpha_per_rank * r
    return set_rank


def _levels(spec: dict, r: int) -> None:
    for a in _sites(spec):
        for level in a["levels"]:
            level["rank"] = r


def _partition(spec: dict, r: int) -> None:
    for a in _sites(spec):
        a["rank"] = max(r, a["router"]["k"])


def _flies(spec: dict, e: int) -> None:
    for a in _sites(spec):
        a["experts"] = max(e, a["router"]["k"])
        a["alpha"] = 2.0 * a["experts"]


METHODS: dict[str, tuple[str, Callable[[dict, int], None], int]] = {
    "lora": ("lora", _rank(2.0), 8),
    "hydralora": ("hydralora", _rank(4.0), 8),
    "molora": ("molora", _rank(2.0), 8),
    "mixlora": ("mixlora", _rank(2.0), 8),
    "smora": ("smora", _partition, 64),
    "flylora": ("flylora", _flies, 32),
    "smore": ("smore", _levels, 8),
    "smore_dense": ("smore_dense", _levels, 8),
    "smore_noisy": ("smore_noisy", _levels, 8),
    "dynmole": ("dynmole", _rank(2.0), 24),
    "comol": ("comol", _rank(2.0), 8),
    "deepseek_mole": ("deepseek_mole", _rank(2.0), 2),
    "lora_mixer": ("lora_mixer", _rank(2.0), 8),
}
"""``{method: (preset, set_size(spec, size), the preset's size)}``."""


def _placed(name: str, size: int, layers: list[int]) -> mf.AdapterSpec:
    preset, set_size, _ = METHODS[name]
    spec = copy.deepcopy(mf.presets.load(preset).model_dump(mode="json"))
    set_size(spec, size)
    for site in spec["sites"]:
        site["target"]["layers"] = layers
    return mf.AdapterSpec.model_validate(spec)


def matched_spec(name: str, model, budget: int | None, top_layers: int) -> tuple[mf.AdapterSpec, int]:
    """``name``'s spec on the top ``top_layers`` layers, sized so that its trainable parameters
    come closest to ``budget`` (``None``: the preset's own size); returns the spec and the size."""
    n = model.config.num_hidden_layers
    layers = list(range(n - top_layers, n))
    preset_size = METHODS[name][2]
    if budget is None:
        return _placed(name, preset_size, layers), preset_size

    def count(size: int) -> int:
        return mf.count_parameters(_placed(name, size, layers), model)

    lo, hi = 1, max(2, preset_size)
    while count(hi) < budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the count grows with the size: the last size under the budget, and the next
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < budget else (lo, mid)
    size = min((lo, hi), key=lambda s: abs(count(s) - budget))
    return _placed(name, size, layers), size
