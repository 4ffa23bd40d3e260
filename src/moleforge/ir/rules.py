"""Rule tables: one rule per node kind (or gate kind) for each job that treats kinds differently
(the interpreter, the printer, the verifier, the FLOP counter, the emitter, the exporters, the
graph plot).

    EMIT = Rules("torch emitter", NODE_KINDS)

    @EMIT.register(nodes.PoolMix, nodes.GroupedMix)
    def _pool(c, n): ...

    EMIT[n](c, n)          # the rule of n's kind; a clear error when the table has none

Every table names the closed set of kinds it must cover; ``tests/ir/test_rule_tables.py`` checks
that each table created (:data:`Rules.tables`) has a rule for every kind of its set, so a new
kind cannot be forgotten by one of them. A kind a job does not apply to gets an explicit rule
that says so (e.g. the low-rank exporter's "not reducible").
"""

from __future__ import annotations

from typing import Callable, ClassVar, Generic, Iterable, TypeVar

__all__ = ["Rules", "MissingRuleError"]

R = TypeVar("R")


class MissingRuleError(LookupError):
    """A rule table has no rule for a kind."""


class Rules(Generic[R]):
    """A table ``kind -> rule`` over the closed set ``kinds``.

    Args:
        name: what the table does, for messages (``"the interpreter"``).
        kinds: every kind the table must cover (``nodes.NODE_KINDS``, ``nodes.GATE_KINDS``).
    """

    tables: ClassVar[list["Rules"]] = []
    """Every table created, for the coverage test."""

    def __init__(self, name: str, kinds: Iterable[type]):
        self.name = name
        self.kinds: tuple[type, ...] = tuple(kinds)
        self._rules: dict[type, R] = {}
        Rules.tables.append(self)

    def register(self, *kinds: type) -> Callable[[R], R]:
        """Decorator: the rule of ``kinds`` (returned unchanged)."""
        def add(rule: R) -> R:
            self.add(rule, *kinds)
            return rule
        return add

    def add(self, rule: R, *kinds: type) -> None:
        """``rule`` for each of ``kinds``."""
        for kind in kinds:
            if kind not in self.kinds:
                raise TypeError(f"{self.name}: {kind.__name__} is not one of the kinds this table covers")
            if kind in self._rules:
                raise TypeError(f"{self.name}: a second rule for {kind.__name__}")
            self._rules[kind] = rule

    def __getitem__(self, obj: object) -> R:
        """The rule of ``obj``'s kind (``obj`` a node, a gate or a kind)."""
        kind = obj if isinstance(obj, type) else type(obj)
        rule = self._rules.get(kind)
        if rule is None:
            raise MissingRuleError(f"{self.name} has no rule for {kind.__name__}; "
                                   f"it has rules for {', '.join(k.__name__ for k in self._rules)}")
        return rule

    def __contains__(self, kind: type) -> bool:
        return kind in self._rules

    def missing(self) -> list[type]:
        """The kinds of the table's set without a rule."""
        return [k for k in self.kinds if k not in self._rules]

    def __repr__(self) -> str:
        return f"Rules({self.name!r}, {len(self._rules)}/{len(self.kinds)} kinds)"
