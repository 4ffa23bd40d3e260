"""The explanation's line about X-LoRA's model-scope classifier (shared by every X-LoRA site)."""

from __future__ import annotations

from ..specs import XLoRARouter

__all__ = ["xlora_lines"]


def xlora_lines(spec, layers: int) -> list[str]:
    """One line naming the classifier when the spec has an ``xlora`` router (``layers``: its sites)."""
    router = next((s.adapter.router for s in spec.sites if isinstance(getattr(s.adapter, "router", None),
                                                                      XLoRARouter)), None)
    if router is None:
        return []
    shape = "one set broadcast to" if not router.layerwise else "one set per"
    hidden = f", size {router.size}" if router.depth > 1 else ""
    return [f"  X-LoRA classifier (trainable, beside the sites' parameters): depth {router.depth}{hidden}, on the base "
            f"model's last hidden state (a first pass); per token {shape} the {layers} X-LoRA sites"]
