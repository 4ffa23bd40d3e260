"""One optimizer step of S'MoRE under DeepSpeed ZeRO (stage 2, then stage 3) on this process,
``deepspeed.initialize`` on the model whose adapter was compiled first; run under ``torchrun``
with ``DS_ACCELERATOR=cpu`` (gloo). Writes ``FOLDER/rank<N>.pt``: per stage, the loss and every
adapter tensor after the step (gathered under ZeRO-3), and the saved adapter of rank 0."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import moleforge as mf
from ddp_helpers import case_batch, case_model

LR = 0.1


def ds_config(stage: int) -> dict:
    """ZeRO at ``stage``, 2 sequences per process, plain SGD (DeepSpeed asks to allow it under ZeRO), no clipping."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "SGD", "params": {"lr": LR}},
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def step(stage: int, rank: int, folder: str) -> dict:
    import deepspeed

    model, handle = case_model("smore")
    model = model.float()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(handle.trainable_parameters()),
                                      config=ds_config(stage))
    batch = case_batch("smore", rank)
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    params = dict(handle.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        after = {k: p.detach().clone() for k, p in params.items()}
        mf.save(handle, Path(folder, f"adapter_stage{stage}_rank{rank}"))  # every rank calls it; rank 0 writes
    return {"loss": float(out.loss.detach()), "aux": float(out.aux_loss.detach()), "after": after}


def main(folder: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    result = {stage: step(stage, rank, folder) for stage in (2, 3)}
    torch.save(result, Path(folder, f"rank{rank}.pt"))
    # every rank leaves the group after the others are done with it (a rank exiting with gloo's
    # threads running aborts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
