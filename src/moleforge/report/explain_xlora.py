"""The explanation's line about X-LoRA's model-scope classifier (shared by every X-LoRA site)."""

from __future__ import annotations

from ..specs import XLoRARouter

__all__ = ["xlora_lines", "classifier_parameters"]


def _router(spec) -> tuple[XLoRARouter, int] | None:
    """The spec's ``xlora`` router and its pool's expert count."""
    return next(((s.adapter.router, s.adapter.experts) for s in spec.sites
                 if isinstance(getattr(s.adapter, "router", None), XLoRARouter)), None)


def classifier_parameters(spec, hidden: int | None, layers: int) -> int:
    """The classifier's parameter count (PEFT's layout: ``depth - 1`` hidden layers of ``size``, then
    the scalings of the ``layers`` sites, or one set broadcast to them); 0 without an ``xlora`` router
    or a known ``hidden`` size."""
    found = _router(spec)
    if found is None or not hidden:
        return 0
    router, experts = found
    out = experts * layers if router.layerwise else experts
    widths = [hidden] + [router.size] * (router.depth - 1) + [out]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def xlora_lines(spec, layers: int, hidden: int | None) -> list[str]:
    """One line naming the classifier when the spec has an ``xlora`` router (``layers``: its sites;
    ``hidden``: the model's hidden size)."""
    found = _router(spec)
    if found is None:
        return []
    router = found[0]
    shape = "one set broadcast to" if not router.layerwise else "one set per"
    hidden_layers = f", size {router.size}" if router.depth > 1 else ""
    count = classifier_parameters(spec, hidden, layers)
    params = f"{count:,} parameters, " if count else ""
    return [f"  X-LoRA classifier (trainable, beside the sites' parameters): depth {router.depth}{hidden_layers}, "
            f"{params}on the base model's last hidden state (a first pass); per token {shape} the {layers} X-LoRA "
            "sites"]
