"""A two-process DDP training step of a routed adapter, run by ``torch.multiprocessing.spawn``
(the worker lives in an importable module so that the spawned processes can unpickle it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


def ddp_worker(rank: int, world: int, folder: str) -> None:
    """Two optimizer steps of ``molora`` on a tiny Llama under DDP with
    ``find_unused_parameters=True`` (the HF Trainer's default); writes ``rank<N>.json`` with the
    losses and the summed adapter gradients of the last step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        import moleforge as mf
        from models import tiny

        model = tiny("llama", layers=1).train()
        handle = mf.compile("molora", model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
        losses, aux = [], []
        for _ in range(2):
            opt.zero_grad()
            out = ddp(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
            aux.append(out.aux_loss.item())
        grads = {k: p.grad.sum().item() for k, p in handle.named_parameters() if p.grad is not None}
        result = {"losses": losses, "aux": aux, "grads": grads, "output": type(out).__name__,
                  "finite": all(math.isfinite(v) for v in losses + aux)}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
