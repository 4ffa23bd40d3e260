"""Published method defaults as JSON specs, loadable by name.

>>> from moleforge import presets
>>> "smore" in presets.names()
True
"""

from __future__ import annotations

from importlib import resources

from ...errors import SpecError
from ..spec import AdapterSpec

__all__ = ["names", "load", "describe"]


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
