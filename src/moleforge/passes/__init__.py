"""Optimisation passes: pure ``Graph -> Graph`` functions, one per file, each an exact
identity stated in its docstring (METHODS.md §20).

``DEFAULT_PIPELINE`` runs, in order: fold input-independent gates; collapse linear residual
trees into flat gated pools; compute all of a tree's down-projections with one GEMM; choose
each pool's kernel (shared down-projection computed once, dense block-gated or grouped) from
the cost model; merge CoMoL's core-space experts into one core per token; fuse the linears
that read the same tensor (router into the down-projection); and, for FFN-block experts,
compute the frozen gate/up projections once and hoist the frozen down projection out of the
expert sum. Each pass leaves graphs it does not apply to unchanged.
``fuse_sibling_sites`` works across sites (q/k/v, gate/up) and is applied by the compiler,
which finds the siblings on the model.
"""

from .choose_pool_kernels import ChoosePoolKernels, PoolCost, choose_pool_kernels, pool_cost
from .collapse_linear_trees import collapse_linear_trees
from .fold_static_gates import fold_static_gates
from .fuse_shared_input_linears import fuse_shared_input_linears
from .fuse_sibling_sites import fuse_sibling_sites
from .group_pools import group_pools
from .hoist_frozen_down import hoist_frozen_down
from .hoist_tree_down_projections import hoist_tree_down_projections
from .merge_cores import merge_cores
from .pipeline import Pass, PipelineTrace, run_pipeline
from .share_down_projections import share_down_projections
from .share_frozen_projections import share_frozen_projections
from .stack_pools import stack_pools

DEFAULT_PIPELINE: tuple[Pass, ...] = (
    fold_static_gates,
    collapse_linear_trees,
    hoist_tree_down_projections,
    choose_pool_kernels,
    merge_cores,
    fuse_shared_input_linears,
    share_frozen_projections,
    hoist_frozen_down,
)

__all__ = [
    "DEFAULT_PIPELINE", "Pass", "PipelineTrace", "run_pipeline", "fold_static_gates", "collapse_linear_trees",
    "hoist_tree_down_projections", "stack_pools", "share_down_projections", "group_pools", "choose_pool_kernels",
    "ChoosePoolKernels", "PoolCost", "pool_cost", "fuse_shared_input_linears", "fuse_sibling_sites",
    "share_frozen_projections", "hoist_frozen_down", "merge_cores",
]
