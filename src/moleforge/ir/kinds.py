"""The bases of the node kinds: operand fields (declared with :func:`operand`, from which
``inputs()`` is derived), ``result_type(graph)``, and the facts routers pass on from their gate."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from functools import cache
from typing import TYPE_CHECKING, Any

from .types import ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["operand", "NodeKind", "RouterNode"]

_OPERAND = {"operand": True}


def operand(*, default: Any = MISSING) -> Any:
    """A field naming the node(s) a node reads: an id, a tuple of ids, or (with
    ``default=None``) an optional id. ``inputs()`` lists the operands in field order."""
    return field(metadata=_OPERAND) if default is MISSING else field(default=default, metadata=_OPERAND)


@cache
def _operands(kind: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(kind) if f.metadata.get("operand"))


class NodeKind:
    """Base of the node kinds: inputs from the operand fields, the result type per kind."""

    __slots__ = ()

    def inputs(self) -> tuple[str, ...]:
        """The ids this node reads, in operand order (``None`` operands left out)."""
        out: list[str] = []
        for name in _operands(type(self)):
            v = getattr(self, name)
            if isinstance(v, str):
                out.append(v)
            elif v is not None:
                out.extend(v)
        return tuple(out)

    def result_type(self, graph: "Graph") -> ValueType:
        """The type of this node's value in ``graph`` (which gives its inputs' types)."""
        raise NotImplementedError(type(self).__name__)


class RouterNode(NodeKind):
    """A node that routes tokens (its value is a routing; the lowered site reports it for
    routing statistics): :class:`Route`, :class:`TreeRoute`."""

    __slots__ = ()

    @property
    def sparse(self) -> bool:
        """Whether each token uses only selected experts (top-k), not all of them."""
        raise NotImplementedError

    @property
    def balances(self) -> bool:
        """Whether a balancing bias, updated from the selection counts, shifts the selection."""
        raise NotImplementedError

    @property
    def input_independent(self) -> bool:
        """Whether every token gets the same gates (the routing does not read the input)."""
        raise NotImplementedError
