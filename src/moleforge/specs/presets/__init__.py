"""Published method defaults as JSON specs, loadable by name.

>>> from moleforge import presets
>>> "smore" in presets.names()
True
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ...errors import SpecError
from ..spec import AdapterSpec

__all__ = ["names", "load", "describe", "as_spec"]


def names() -> list[str]:
    """Names of every shipped preset, sorted."""
    files = resources.files(__name__)
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def load(name: str) -> AdapterSpec:
    """The preset ``name`` as an :class:`AdapterSpec`.

    Raises:
        SpecError: no preset has that name (the message lists them).
    """
    if name not in names():
        raise SpecError(f"no preset named {name!r}; available: {', '.join(names())}",
                        [("preset", f"unknown name {name!r}")])
    text = resources.files(__name__).joinpath(f"{name}.json").read_text()
    return AdapterSpec.model_validate_json(text)


def describe() -> dict[str, str]:
    """``{name: one-line description}`` of every preset."""
    return {n: load(n).description for n in names()}


def as_spec(spec: Any) -> AdapterSpec:
    """Accept an ``AdapterSpec``, a dict, a JSON string or a preset name."""
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, dict):
        return AdapterSpec.model_validate(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            return AdapterSpec.model_validate_json(text)
        return load(text)
    raise SpecError(f"expected an AdapterSpec, a dict, JSON text or a preset name, got {type(spec).__name__}")
