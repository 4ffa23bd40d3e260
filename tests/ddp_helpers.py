"""A two-process DDP training step of a routed adapter, run by ``torch.multiprocessing.spawn``
(the worker lives in an importable module so that the spawned processes can unpickle it)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


@contextlib.contextmanager
def process_group(rank: int, world: int, folder: str):
    """A gloo group over ``folder``'s file store. On success every rank meets at a barrier before
    the group is destroyed, so no rank tears its sockets down while a peer still talks to it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, world: int, folder: str) -> None:
    """Two optimizer steps of ``molora`` on a tiny Llama under DDP with
    ``find_unused_parameters=True`` (the HF Trainer's default); writes ``rank<N>.json`` with the
    losses and the summed adapter gradients of the last step."""
    with process_group(rank, world, folder):
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


# ---- gradients of aux losses summed over the ranks --------------------------------------------

WORLD = 2
SEQ = 7


def _with_cv2(preset: str) -> dict:
    """``preset`` with the CV² importance + load loss instead of its own aux loss."""
    import moleforge as mf

    spec = mf.presets.load(preset).model_dump(mode="json")
    spec["sites"][0]["adapter"]["aux_losses"] = [{"kind": "cv2_importance_load", "weight": 0.3}]
    return spec


GRAD_CASES = ("molora", "molora_padded", "smore", "smore_padded", "smore_checkpointed", "loramoe", "pool_cv2",
              "smore_cv2")
"""Specs whose DDP gradients are compared with one process's: Switch loss of a flat pool and of a
residual tree, padded batches of both, activation checkpointing (the recomputation in backward
sums the statistics over the ranks again), LoRAMoE's localized balance with sample types, and the
CV² loss of a pool and of a tree."""


def case_spec(case: str):
    """The case's spec: its preset (or a variant), up-projections drawn (every gradient non-zero),
    aux losses weighted up so that their gradients are not lost beside the LM loss's."""
    import moleforge as mf

    base = case.removesuffix("_padded").removesuffix("_checkpointed")
    variants = {"pool_cv2": "molora", "smore_cv2": "smore"}
    spec = mf.presets.as_spec(_with_cv2(variants[base]) if base in variants else base)
    return spec.with_init(mf.Init(up="normal", std=0.3, seed=1)).model_copy(update={"aux_loss_coef": 20.0})


def case_model(case: str):
    """A float64 one-layer tiny Llama with the case's adapter, in training mode: ``(model, handle)``."""
    import moleforge as mf
    from models import tiny

    model = tiny("llama", layers=1).double().train()
    handle = mf.compile(case_spec(case), model)
    if case.endswith("_checkpointed"):
        model.config.use_cache = False
        model.activation_checkpointing_enable()
    return model, handle


def case_batch(case: str, rank: int) -> dict:
    """Rank ``rank``'s batch: 2 sequences of ``SEQ`` tokens; ``_padded`` cases pad two positions
    of each rank (so every rank has as many real tokens, and the mean LM loss of the whole batch
    is the mean of the ranks' means); LoRAMoE's carries sample types."""
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if case.endswith("_padded"):
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0 if rank == 0 else 1
        mask[1, -2:] = 1 if rank == 0 else 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    if case == "loramoe":
        batch["types"] = torch.tensor([rank % 2, 1])
    return batch


def concat_batch(case: str, world: int = WORLD) -> dict:
    """Every rank's batch as one batch (what a single process trains on)."""
    parts = [case_batch(case, r) for r in range(world)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def forward_backward(model, handle, batch: dict):
    """One forward (with LoRAMoE's sample types) and backward of ``model`` (a model or its DDP
    wrapper); returns the output."""
    from contextlib import nullcontext

    batch = dict(batch)
    types = batch.pop("types", None)
    with handle.sample_types(types) if types is not None else nullcontext():
        out = model(**batch)
    out.loss.backward()
    return out


def adapter_grads(handle) -> dict[str, torch.Tensor]:
    """Every trainable adapter tensor's gradient (a sharded one gathered: FSDP2)."""
    out = {}
    for k, p in handle.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[k] = torch.zeros(p.shape, dtype=p.dtype) if g is None else g.detach().clone()
    return out


def reference_grads(case: str) -> tuple[dict[str, torch.Tensor], float]:
    """One process, the concatenated batch: the adapter gradients and the aux loss."""
    model, handle = case_model(case)
    out = forward_backward(model, handle, concat_batch(case))
    return adapter_grads(handle), float(out.aux_loss.detach())


BALANCE_RATE = 0.25


def balancing_spec():
    """``smora`` on q and v with a visible bias step."""
    import moleforge as mf

    spec = mf.presets.load("smora").model_dump(mode="json")
    spec["sites"][0]["adapter"]["router"]["bias_update_rate"] = BALANCE_RATE
    spec["sites"][0]["adapter"]["rank"] = 16
    spec["sites"][0]["adapter"]["router"]["k"] = 3
    return mf.AdapterSpec.model_validate(spec).with_init(mf.Init(up="normal", std=0.3, seed=1))


def balancing_batches(rank: int, micro: int = 2) -> list[torch.Tensor]:
    """Rank ``rank``'s micro-batches of one optimizer step."""
    return [torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(200 + 10 * rank + i))
            for i in range(micro)]


def balancing_step(model, handle, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward and backward every micro-batch (each DDP forward broadcasts the buffers), then
    ``update_balancing``: the biases."""
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    handle.update_balancing()
    return {k: v.clone() for k, v in handle.state_dict().items() if k.endswith("balance")}


def reference_biases(world: int = WORLD) -> dict[str, torch.Tensor]:
    """One process routing every rank's micro-batches, then one balancing update."""
    import moleforge as mf
    from models import tiny

    model = tiny("llama", layers=1).double().train()
    handle = mf.compile(balancing_spec(), model)
    return balancing_step(model, handle, [b for r in range(world) for b in balancing_batches(r)])


def noisy_logits(rank: int | None = None) -> list[torch.Tensor]:
    """``smore_noisy``'s logits on one batch in training mode, twice, after ``seed_noise(7)``
    (``rank``: as that rank would seed it)."""
    model, handle = case_model("smore_noisy")
    out = []
    for _ in range(2):
        handle.seed_noise(7, rank=rank)
        with torch.no_grad():
            out.append(model(input_ids=case_batch("molora", 0)["input_ids"]).logits)
    return out


def ddp_stats_worker(rank: int, world: int, folder: str) -> None:
    """Under DDP: every grad case with the statistics summed over the ranks and without
    (``set_statistics_group(None)``), a ``smora`` balancing step, ``mf.save`` on every rank (to
    ``adapter_rank<N>``), the noisy gate's logits seeded per rank and one step of every preset;
    writes ``rank<N>.pt``."""
    with process_group(rank, world, folder):
        import moleforge as mf
        from models import tiny

        grads, aux = {}, {}
        for case in GRAD_CASES:
            for reduce in (True, False):
                model, handle = case_model(case)
                if not reduce:
                    handle.set_statistics_group(None)
                ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                out = forward_backward(ddp, handle, case_batch(case, rank))
                grads[case, reduce] = adapter_grads(handle)
                aux[case, reduce] = float(out.aux_loss.detach())
        model = tiny("llama", layers=1).double().train()
        handle = mf.compile(balancing_spec(), model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        biases = balancing_step(ddp, handle, balancing_batches(rank))
        mf.save(handle, Path(folder, f"adapter_rank{rank}"))
        torch.save({"grads": grads, "aux": aux, "biases": biases, "noise": noisy_logits(),
                    "presets": every_preset(folder, rank, _ddp)}, Path(folder, f"rank{rank}.pt"))


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def every_preset(folder: str, rank: int, wrap) -> dict:
    """``{preset: (adapter gradients, aux loss)}`` of one step of every preset under ``wrap``
    (``preset_cases.py``; the folders of frozen experts made in ``folder`` before the spawn)."""
    import moleforge as mf
    from preset_cases import rank_step

    return {name: rank_step(name, folder, rank, wrap) for name in mf.presets.names()}


# ---- FSDP2 -------------------------------------------------------------------------------------

FSDP_CASES = ("molora", "smore")


def shard(model) -> None:
    """FSDP2 over the decoder layers and the whole model, the usual wrapping."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def fsdp_worker(rank: int, world: int, folder: str) -> None:
    """Under FSDP2 (``fully_shard``): the grad cases' gradients, a ``smora`` balancing step, and
    ``mf.save`` called on every rank (to ``adapter_rank<N>``: only rank 0's may appear), read back
    into a fresh sharded adapter, and one step of every preset; writes ``rank<N>.pt``."""
    with process_group(rank, world, folder):
        import moleforge as mf
        from models import tiny
        from moleforge.interop.own_format import read_adapter

        grads = {}
        for case in FSDP_CASES:
            model, handle = case_model(case)
            shard(model)
            forward_backward(model, handle, case_batch(case, rank))
            grads[case] = adapter_grads(handle)
        model = tiny("llama", layers=1).double().train()
        handle = mf.compile(balancing_spec(), model)
        shard(model)
        biases = balancing_step(model, handle, balancing_batches(rank))
        saved = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                 for k, v in handle.state_dict().items()}
        mf.save(handle, Path(folder, f"adapter_rank{rank}"))
        dist.barrier()
        fresh = tiny("llama", layers=1).double().train()
        again = mf.compile(balancing_spec().with_init(mf.Init(up="normal", std=0.3, seed=2)), fresh)
        shard(fresh)
        again.load_state_dict(read_adapter(Path(folder, "adapter_rank0"))[1])
        loaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in again.state_dict().items()}
        sharded = any(hasattr(v, "full_tensor") for v in again.state_dict().values())
        torch.save({"grads": grads, "biases": biases, "saved": saved, "loaded": loaded, "sharded": sharded,
                    "presets": every_preset(folder, rank, _sharded)}, Path(folder, f"rank{rank}.pt"))


def _sharded(model):
    shard(model)
    return model
