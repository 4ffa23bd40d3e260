"""Sums of routing statistics over the ranks of a data-parallel run.

Under ``DistributedDataParallel`` or FSDP each rank routes its own share of the batch. The
balance losses are not sums over tokens (``switch_lb`` multiplies two token means, the CV²
losses divide a variance by a squared mean), so the mean of the ranks' losses is not the loss
of the whole batch. The aux-loss ops therefore sum their statistics over the ranks (selection
counts, summed probabilities, token counts) before forming the loss, through an all-reduce
whose backward sums the gradients over the ranks too: every rank then holds the loss of the
whole batch, and after DDP (or FSDP) averages the gradients over the ranks they are the
gradients of that loss, as one process would compute them on the concatenated batch.

A site reduces when its module is training, autograd is recording, ``torch.distributed`` is
initialised and the site's group (``site.stat_group``: :data:`WORLD` for the default group, a
``ProcessGroup``, or ``None`` for no reduction; ``AdapterHandle.set_statistics_group``) has
more than one rank. Otherwise nothing here runs: a single process computes exactly what it
did, with no collective and nothing for ``torch.compile`` to trace. Every rank of the group
must run the same sites in the same order (as data parallelism does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["WORLD", "reduce_group", "group_of", "all_sum", "all_sum_", "rank_in", "rank_seed"]

WORLD = "world"
"""``stat_group`` value for the default process group (all ranks), whichever it is when the
forward runs."""


def group_of(group: Any) -> Any | None:
    """The process group that ``group`` (:data:`WORLD`, a group or ``None``) names, when
    ``torch.distributed`` is initialised and it has more than one rank; else ``None``."""
    if group is None:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    pg = dist.group.WORLD if group == WORLD else group
    return pg if dist.get_world_size(pg) > 1 else None


def reduce_group(group: Any, training: bool) -> Any | None:
    """The group an aux loss sums its statistics over in this forward (see the module doc),
    or ``None``: not training, no autograd, not distributed, or a group of one."""
    if group is None or not training or not torch.is_grad_enabled():
        return None
    return group_of(group)


def all_sum(t: Tensor, group: Any) -> Tensor:
    """``Σ_ranks t``, differentiable: the backward sums the gradients over the ranks too (the
    functional collective ``_c10d_functional.all_reduce``, whose autograd rule is an all-reduce
    of the gradient, as ``torch.distributed.nn.functional.all_reduce``'s, which PyTorch 2.13
    deprecates)."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_reduce(t.contiguous(), "sum", group)
    return funcol.wait_tensor(out)


def all_sum_(t: Tensor, group: Any) -> Tensor:
    """``t`` replaced by ``Σ_ranks t`` in place, outside autograd (counts)."""
    torch.distributed.all_reduce(t, group=group)
    return t


def rank_in(group: Any) -> int:
    """This process's rank in ``group`` (:data:`WORLD` or a group); 0 when not distributed."""
    dist = torch.distributed
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(dist.group.WORLD if group == WORLD else group)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank`` derived from ``seed``: ``seed`` itself on rank 0 (a single process
    draws what it always drew), a well-separated one per other rank (a 64-bit golden-ratio
    step, so that ranks do not share noise and neighbouring seeds do not share ranks' streams)."""
    if rank == 0:
        return seed
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63
