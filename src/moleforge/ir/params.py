"""Parameters are referenced by the IR, never held: ``ParamRef`` names a stored tensor,
and small expressions over refs (``BlockRows``, ``BlockColumns``, ``Pick``, ``Concat``)
describe re-parameterised views, so passes can fuse and export can un-fuse mechanically.

Storage convention (DESIGN.md): expert pools are stacked from the start,
``A: (E, r, d_in)``, ``B: (E, d_out, r)``; linears are ``[out, in]`` as in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

__all__ = ["ParamRef", "BlockRows", "BlockColumns", "Pick", "Concat", "ParamExpr", "ParamDecl",
           "expr_shape", "expr_refs", "format_expr"]


@dataclass(frozen=True, slots=True)
class ParamRef:
    """A stored tensor of the site, by name."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlockRows:
    """``(E, r, d) -> (E·r, d)``: expert blocks stacked as rows (a stacked down-projection)."""

    src: "ParamExpr"


@dataclass(frozen=True, slots=True)
class BlockColumns:
    """``(E, d, r) -> (d, E·r)``: expert blocks side by side as columns (a stacked up-projection)."""

    src: "ParamExpr"


@dataclass(frozen=True, slots=True)
class Pick:
    """``(E, ...) -> (...)``: one expert's slice (a shared factor stored with E = 1)."""

    src: "ParamExpr"
    index: int


@dataclass(frozen=True, slots=True)
class Concat:
    """Concatenation along ``dim`` (rows of several linears fused into one GEMM: dim 0)."""

    parts: tuple["ParamExpr", ...]
    dim: int = 0


ParamExpr = Union[ParamRef, BlockRows, BlockColumns, Pick, Concat]


@dataclass(frozen=True, slots=True)
class ParamDecl:
    """A tensor the site stores: its name, shape, role, initialisation and whether
    training updates it (``trainable``) or it is a buffer (``buffer``: balancing biases,
    frozen random projections)."""

    name: str
    shape: tuple[int, ...]
    init: Literal["kaiming", "zero", "up", "bias", "sparse_random", "keys", "one", "frozen", "mean", "gaussian"]
    """``frozen``: a frozen input (``Graph.frozen``), bound to the model's own tensor, never initialised;
    ``one``: ones; ``mean``: ``1 / n`` of the last dimension's n (weights that average); ``gaussian``:
    N(0, 1/fan_in) (EPT's meta-seed and task embeddings)."""
    trainable: bool = True
    buffer: bool = False
    fan_in: int = 0
    """Fan-in used by ``kaiming`` (0: last dim); density for ``sparse_random`` is in ``density``."""
    density: float = 1.0


def expr_shape(e: ParamExpr) -> tuple[int, ...]:
    """Shape of the tensor an expression denotes."""
    match e:
        case ParamRef(shape=s):
            return s
        case BlockRows(src=s):
            E, r, d = expr_shape(s)
            return (E * r, d)
        case BlockColumns(src=s):
            E, d, r = expr_shape(s)
            return (d, E * r)
        case Pick(src=s):
            return expr_shape(s)[1:]
        case Concat(parts=ps, dim=dim):
            shapes = [expr_shape(p) for p in ps]
            out = list(shapes[0])
            out[dim] = sum(s[dim] for s in shapes)
            return tuple(out)
    raise TypeError(f"not a parameter expression: {e!r}")


def expr_refs(e: ParamExpr) -> list[ParamRef]:
    """Every ``ParamRef`` an expression reads, in order."""
    match e:
        case ParamRef():
            return [e]
        case BlockRows(src=s) | BlockColumns(src=s) | Pick(src=s):
            return expr_refs(s)
        case Concat(parts=ps):
            return [r for p in ps for r in expr_refs(p)]
    raise TypeError(f"not a parameter expression: {e!r}")


def format_expr(e: ParamExpr | None) -> str:
    """Compact text form used by the printer: ``rows(A)``, ``cat0(rows(A), Wg)``."""
    match e:
        case None:
            return "-"
        case ParamRef(name=n):
            return n
        case BlockRows(src=s):
            return f"rows({format_expr(s)})"
        case BlockColumns(src=s):
            return f"cols({format_expr(s)})"
        case Pick(src=s, index=i):
            return f"{format_expr(s)}[{i}]"
        case Concat(parts=ps, dim=d):
            return f"cat{d}(" + ", ".join(format_expr(p) for p in ps) + ")"
    raise TypeError(f"not a parameter expression: {e!r}")
