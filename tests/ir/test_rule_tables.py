"""Every rule table has a rule for every kind of its closed set (node kinds or gate kinds), so a
new kind cannot be forgotten by the interpreter, the printer, the verifier, the FLOP counter,
the emitter, the low-rank exporter or the graph plot; and the kinds carry their facts."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from moleforge.ir import ParamRef, Rules, nodes
from moleforge.ir.rules import MissingRuleError

TABLE_MODULES = (
    "moleforge.ir.interpret",
    "moleforge.ir.printer",
    "moleforge.ir.verify",
    "moleforge.report.flops",
    "moleforge.backends.torch_fx.lower",
    "moleforge.interop.lowrank",
    "moleforge.cli.graph_plot",
)
for _module in TABLE_MODULES:
    importlib.import_module(_module)

EXPECTED_TABLES = {
    "the interpreter", "the interpreter's gates", "the printer", "the printer's gates", "the verifier",
    "the verifier's gates", "the FLOP counter", "the torch emitter", "the torch emitter's gates",
    "the low-rank reduction", "the low-rank reduction's gates", "the graph plot",
}

GATES = {
    nodes.SoftmaxTopK: nodes.SoftmaxTopK(k=2),
    nodes.DenseSoftmax: nodes.DenseSoftmax(),
    nodes.SigmoidTopK: nodes.SigmoidTopK(k=2, balance=ParamRef("balance", (4,))),
    nodes.AbsTopK: nodes.AbsTopK(k=2, balance=ParamRef("balance", (4,))),
    nodes.StaticGate: nodes.StaticGate(weights=ParamRef("router_w", (4,))),
    nodes.TopPTsallis: nodes.TopPTsallis(k=2, top_p=0.75, q=1.1, threshold=0.9),
    nodes.SelfActivated: nodes.SelfActivated(k=2, temperature=1.0, threshold=0.1),
    nodes.DenseTrainTopK: nodes.DenseTrainTopK(infer_k=2),
    nodes.XLoRAScale: nodes.XLoRAScale(top_k=2, softmax_topk=True, weight=1.5),
}


def _subclasses(base: type) -> set[str]:
    """Names of the subclasses of ``base`` (a slotted dataclass leaves its first class behind too)."""
    out = set()
    for sub in base.__subclasses__():
        out |= {sub.__name__} | _subclasses(sub)
    return out


def _names(kinds) -> set[str]:
    return {k.__name__ for k in kinds}


def test_every_table_is_known():
    assert EXPECTED_TABLES <= {t.name for t in Rules.tables}


@pytest.mark.parametrize("table", Rules.tables, ids=lambda t: t.name)
def test_table_covers_every_kind(table):
    missing = table.missing()
    assert not missing, f"{table.name} has no rule for {', '.join(k.__name__ for k in missing)}"


def test_the_kind_sets_are_closed():
    """Every node kind is in the ``Node`` union, every gate kind in the ``Gate`` union."""
    bases = {"RouterNode"} | {name for name in _subclasses(nodes.NodeKind) if name.startswith("_")}
    assert _subclasses(nodes.NodeKind) - bases == _names(nodes.NODE_KINDS)
    assert _subclasses(nodes.GateKind) == _names(nodes.GATE_KINDS) == _names(GATES)


@pytest.mark.parametrize("kind", nodes.NODE_KINDS, ids=lambda k: k.__name__)
def test_node_kind_declares_its_facts(kind):
    names = {f.name for f in dataclasses.fields(kind)}
    assert {"id", "origin"} <= names
    assert kind.result_type is not nodes.NodeKind.result_type, f"{kind.__name__} has no result_type"
    for f in dataclasses.fields(kind):
        if f.name in ("src", "srcs", "routing") or f.name.endswith("_base"):
            assert f.metadata.get("operand"), f"{kind.__name__}.{f.name} is not declared an operand"


@pytest.mark.parametrize("gate", GATES.values(), ids=lambda g: type(g).__name__)
def test_gate_facts(gate):
    assert gate.sparse == (gate.k is not None)
    assert gate.balances == hasattr(gate, "balance")
    assert gate.input_independent == (not gate.sparse and hasattr(gate, "weights"))
    route = nodes.Route(id="route", src="x", gate=gate, experts=4)
    assert (route.k, route.sparse, route.balances, route.input_independent) == \
        (gate.k, gate.sparse, gate.balances, gate.input_independent)


def test_inputs_follow_the_operands():
    block = nodes.ExpertHidden(id="h", src="x", routing="route", up=None, up_base="u")  # type: ignore[arg-type]
    assert block.inputs() == ("x", "route", "u")
    assert nodes.Add(id="y", srcs=("a", "b", "c")).inputs() == ("a", "b", "c")
    assert nodes.TreePathGates(id="g", routing="route", level=0).inputs() == ("route",)
    assert nodes.Input(id="x", width=3).inputs() == ()


def test_a_missing_rule_names_the_kind_and_the_table():
    table = Rules("a test table", nodes.NODE_KINDS)
    Rules.tables.remove(table)
    with pytest.raises(MissingRuleError, match="a test table has no rule for Add"):
        table[nodes.Add(id="y", srcs=("a",))]


@pytest.mark.parametrize("kind", nodes.GATE_KINDS, ids=lambda k: k.__name__)
def test_router_text_covers_every_gate(kind):
    """The explain report's words per router kind (``report/explain_text.ROUTER_WORDS``)."""
    from moleforge.report.explain_text import ROUTER_WORDS, router_text
    assert set(ROUTER_WORDS) == set(nodes.GATE_KINDS)
    text = router_text(nodes.Route(id="route", src="x", gate=GATES[kind], experts=4))
    assert text and "{" not in text and kind.__name__ not in text
