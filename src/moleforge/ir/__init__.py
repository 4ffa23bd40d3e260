"""The adapter IR: node kinds, graphs, the verifier, the printer and the float64
reference interpreter that defines the semantics."""

from . import nodes
from .graph import Graph
from .interpret import Result, block_activation, eval_expr, interpret
from .nodes import *  # noqa: F403 - the node kinds, gate kinds and their bases (nodes.__all__)
from .params import (
    BlockColumns,
    BlockRows,
    Concat,
    ParamDecl,
    ParamExpr,
    ParamRef,
    Pick,
    expr_refs,
    expr_shape,
    format_expr,
)
from .printer import format_node, print_graph
from .rules import MissingRuleError, Rules
from .types import PerExpertType, RoutingType, ScalarType, TensorType, TreeRoutingType, ValueType
from .values import Routing, TreeRouting
from .verify import verify

__all__ = [
    "nodes", "Graph", "Result", "interpret", "eval_expr", "verify", "print_graph", "format_node", "block_activation",
    "ParamRef", "BlockRows", "BlockColumns", "Pick", "Concat", "ParamExpr", "ParamDecl",
    "expr_refs", "expr_shape", "format_expr", "Rules", "MissingRuleError",
    "TensorType", "RoutingType", "TreeRoutingType", "ScalarType", "PerExpertType", "ValueType",
    "Routing", "TreeRouting",
    *nodes.__all__,
]
