"""One training step under ``accelerate launch --use_fsdp --fsdp_version 2``, as a script:
``accelerate launch ... accelerate_worker.py CASE FOLDER`` writes ``FOLDER/rank<N>.pt`` (the adapter
gradients, gathered) and calls ``mf.save`` on every process (to ``FOLDER/adapter_rank<N>``).

On GPUs ``accelerator.prepare`` shards the model with FSDP2. On a CPU, Accelerate 1.16 joins the
processes with gloo (``MULTI_CPU``) but selects FSDP only for accelerator devices, so the script
shards with ``fully_shard`` itself, as Accelerate's FSDP2 does (each decoder layer, then the root),
and prepares the optimizer only."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

import moleforge as mf
from ddp_helpers import adapter_grads, case_batch, case_model, shard


def main(case: str, folder: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.set_num_threads(1)
    model, handle = case_model(case)
    if accelerator.distributed_type == DistributedType.FSDP:
        model = accelerator.prepare(model)
    else:
        shard(model)
    opt = accelerator.prepare(torch.optim.SGD(handle.trainable_parameters(), lr=0.1))
    out = model(**case_batch(case, accelerator.process_index))
    accelerator.backward(out.loss)
    grads = adapter_grads(handle)
    sharded = all(hasattr(p, "full_tensor") for p in handle.trainable_parameters())
    opt.step()
    mf.save(handle, Path(folder, f"adapter_rank{accelerator.process_index}"))
    info = {"grads": grads, "aux": float(out.aux_loss.detach()), "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "sharded": sharded}
    torch.save(info, Path(folder, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
