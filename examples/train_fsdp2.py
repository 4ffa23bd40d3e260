"""FSDP2 (``torch.distributed.fsdp.fully_shard``) training of a moleforge adapter in a plain loop:
the frozen model and the adapter are sharded over the processes, the aux losses and balancing
counts summed over them, and ``mf.save`` (called on every process) gathers the shards and
writes on rank 0.

    torchrun --nproc_per_node 2 examples/train_fsdp2.py --preset smore --out runs/fsdp2   # CPU: gloo
    torchrun --nproc_per_node 8 examples/train_fsdp2.py --preset molora                  # GPUs: nccl
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import moleforge as mf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smore")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/fsdp2-example")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same base model and adapter initialisation on every process
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).to(device)
    adapter = mf.compile(mf.presets.load(args.preset), model)  # compile first, then shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    adapter.seed_noise(args.seed)  # one noise stream per rank
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=args.lr)  # the sharded parameters

    gen = torch.Generator().manual_seed(1000 + rank)  # each process draws its own batches
    model.train()
    for step in range(1, args.steps + 1):
        start = torch.randint(0, cfg.vocab_size, (args.batch_size, 1), generator=gen)
        ids = ((start + 3 * torch.arange(24)) % cfg.vocab_size).to(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()  # FSDP2 averages the gradients over the ranks
        opt.step()
        opt.zero_grad()
        adapter.update_balancing()  # every rank: counts summed over the ranks, biases stay equal
        if rank == 0 and (step == 1 or step % 5 == 0):
            aux = out.get("aux_loss")
            print(f"step {step:3d}  loss {out.loss.item():.4f}" + ("" if aux is None else f"  aux {aux.item():.4f}"))
    path = mf.save(adapter, args.out)  # every rank: the shards are gathered, rank 0 writes
    dist.barrier()
    if rank == 0:
        print(f"adapter saved to {path}/")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
