"""The frozen pydantic base of every spec model, and the conversion of pydantic's
validation errors into :class:`~moleforge.errors.SpecError` naming each field path."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import SpecError

__all__ = ["SpecModel", "spec_error_from", "MAX_ALPHA", "MAX_LOSS_WEIGHT", "MIN_TEMPERATURE", "MAX_BIAS_RATE",
           "MAX_INIT_STD"]

# Bounds of the numbers that scale what an adapter computes. Beyond them a spec is not a
# plausible setting but a typo, and it trains to infinity or NaN within a step or two in float32
# (an aux weight of 1e30, a bias step of 1e300); within them every spec trains to finite losses.
MAX_ALPHA = 1e4
"""``alpha`` (the LoRA scale ``alpha / rank`` of a rank-1 update stays at most 10⁴)."""
MAX_LOSS_WEIGHT = 1e3
"""Aux-loss ``weight`` and the spec's ``aux_loss_coef``."""
MIN_TEMPERATURE = 1e-3
"""Router ``temperature``: logits divided by less overflow float32."""
MAX_BIAS_RATE = 1.0
"""``bias_update_rate`` of the balancing biases (one step of 1 already outweighs a sigmoid score)."""
MAX_INIT_STD = 10.0
"""``init.std`` of the up-projections drawn with ``up = "normal"``."""


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def spec_error_from(err: ValidationError, model: str) -> SpecError:
    """Turn a pydantic ``ValidationError`` into a ``SpecError`` listing every bad field."""
    problems: list[tuple[str, str]] = []
    for e in err.errors(include_url=False):
        # Tagged unions add the tag as a path element ("residual_tree"); keep it: it says
        # which variant was being validated.
        path = _path(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("value_error", "missing", "extra_forbidden") and "input" in e:
            msg += f" (got {e['input']!r})"
        if e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            tags = (e.get("ctx") or {}).get("expected_tags", "")
            msg = "missing or unknown 'kind'" + (f"; expected one of {tags}" if tags else "")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling against `moleforge schema`"
        problems.append((path, msg))
    lines = "\n".join(f"  {p}: {m}" for p, m in problems)
    return SpecError(f"invalid {model}: {len(problems)} problem(s)\n{lines}", problems)


_DEPTH: ContextVar[int] = ContextVar("moleforge_spec_depth", default=0)


class SpecModel(BaseModel):
    """Frozen, closed (``extra="forbid"``) base of every spec object.

    Every float field of every spec object is finite (``allow_inf_nan=False``): infinity or NaN
    would train to NaN and could not be written back as JSON (``model_dump_json`` gives
    ``null``), so they are refused like any other bad value, with the field's path.

    Construction and ``model_validate*`` raise :class:`SpecError` instead of pydantic's
    ``ValidationError``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        with _converting(type(self).__name__):
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        with _converting(cls.__name__):
            return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any):  # type: ignore[override]
        with _converting(cls.__name__):
            return super().model_validate_json(json_data, **kwargs)


@contextmanager
def _converting(model: str) -> Iterator[None]:
    # pydantic calls a custom __init__ for nested models too; only the outermost call
    # converts, so nested errors keep their full field path.
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield
    except ValidationError as e:
        if _DEPTH.get() > 1:
            raise
        raise spec_error_from(e, model) from None
    finally:
        _DEPTH.reset(token)
