"""The adapter IR: node kinds, graphs, the verifier, the printer and the float64
reference interpreter that defines the semantics."""

from .graph import Graph, width_of
from .interpret import Result, block_activation, eval_expr, interpret
from .nodes import (
    ROUTING_NODES,
    AbsTopK,
    Add,
    AuxLoss,
    BlockActivation,
    BlockGate,
    Columns,
    DenseSoftmax,
    ExpertFFN,
    ExpertHidden,
    ExpertLinear,
    ExpertLoRA,
    ExpertSum,
    Gate,
    GateBias,
    GroupedMix,
    Input,
    Jitter,
    Linear,
    Node,
    OuterGate,
    PoolMix,
    Route,
    SiblingLinear,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TreeGateLevel,
    TreeLevelParams,
    TreeMix,
    TreePathGates,
    TreePropagate,
    TreeRoute,
)
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
from .verify import verify

__all__ = [
    "Graph", "width_of", "Result", "interpret", "eval_expr", "verify", "print_graph", "format_node",
    "Node", "Input", "Linear", "Columns", "Add", "Jitter", "Route", "PoolMix", "GroupedMix", "BlockGate",
    "OuterGate", "TreeRoute", "TreeGateLevel", "TreeLevelParams", "TreeMix", "TreePropagate", "AuxLoss",
    "ExpertLinear", "ExpertFFN", "ExpertHidden", "ExpertSum", "ExpertLoRA", "BlockActivation", "block_activation",
    "TreePathGates", "GateBias", "SiblingLinear", "ROUTING_NODES",
    "Gate", "SoftmaxTopK", "DenseSoftmax", "SigmoidTopK", "AbsTopK", "StaticGate",
    "ParamRef", "BlockRows", "BlockColumns", "Pick", "Concat", "ParamExpr", "ParamDecl",
    "expr_refs", "expr_shape", "format_expr",
]
