"""Data-parallel training of a moleforge adapter in a plain loop with 🤗 Accelerate: each
process trains on its own share of the batches; the aux losses and the SMoRA / FlyLoRA
balancing counts are summed over the processes; process 0 writes the adapter.

    accelerate launch --multi_gpu --num_processes 4 examples/train_accelerate.py --preset smora   # 4 GPUs
    torchrun --nproc_per_node 2 examples/train_accelerate.py --preset smore      # 2 CPU processes (gloo)
    python examples/train_accelerate.py                                            # 1 process

(``accelerate launch --cpu`` starts one process unless MPI is set up; ``torchrun`` starts the CPU
processes, and ``Accelerator(cpu=True)`` joins them with gloo.)
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import moleforge as mf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smore")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/accelerate-example")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # sets up torch.distributed when launched
    torch.manual_seed(args.seed)  # the same base model and adapter initialisation on every process
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    adapter = mf.compile(mf.presets.load(args.preset), model)  # before wrapping the model
    adapter.seed_noise(args.seed)  # after torch.distributed is up: one noise stream per rank
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=args.lr)

    # next token = token + 3 (mod vocab); each process draws its own batches
    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)
    starts = torch.randint(0, cfg.vocab_size, (args.steps * args.batch_size, 1), generator=gen)
    data = (starts + 3 * torch.arange(24)) % cfg.vocab_size
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    model, opt = accelerator.prepare(model, opt)  # the loader is already per process: not prepared

    accelerator.print(f"{accelerator.num_processes} process(es), {args.batch_size} sequences each per step")
    model.train()
    for step, ids in enumerate(loader, 1):
        ids = ids.to(accelerator.device)
        out = model(input_ids=ids, labels=ids)  # out.loss holds the aux loss of every process's tokens
        accelerator.backward(out.loss)
        opt.step()
        opt.zero_grad()
        adapter.update_balancing()  # on every process: sums the counts over the processes
        if step == 1 or step % 5 == 0:
            loss = accelerator.reduce(out.loss.detach(), reduction="mean")
            aux = out.get("aux_loss")  # None for adapters without aux losses (SMoRA balances by its bias)
            extra = "" if aux is None else f"  aux {aux.item():.4f}"
            accelerator.print(f"step {step:3d}  loss {loss.item():.4f}{extra}")
    accelerator.wait_for_everyone()
    path = mf.save(adapter, args.out)  # every process calls it; process 0 writes
    accelerator.print(f"adapter saved to {path}/")


if __name__ == "__main__":
    main()
