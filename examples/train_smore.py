"""Compile the `smore` preset into a tiny Llama built from a config, train it briefly on a
synthetic counting task, print the loss falling, and save the adapter.

    python examples/train_smore.py --steps 40 --out runs/smore-example
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moleforge as mf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smore")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default="runs/smore-example")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    adapter = mf.compile(mf.presets.load(args.preset), model)
    print(adapter)
    print(f"structural flexibility Γ = {mf.structural_flexibility(adapter.spec)}")

    # a task the frozen random model cannot do: count upwards, next token = token + 3 (mod vocab)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=args.lr)
    model.train()
    first = last = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        start = torch.randint(0, cfg.vocab_size, (8, 1), generator=gen)
        ids = (start + 3 * torch.arange(24)) % cfg.vocab_size
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        adapter.update_balancing()
        loss = out.loss.item()
        first = loss if first is None else first
        last = loss
        if step == 1 or step % 10 == 0:
            aux = adapter.aux_loss()
            print(f"step {step:4d}  loss {loss:.4f}  aux {0.0 if aux is None else aux.item():.4f}")
    print(f"loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.1f}s")
    path = mf.save(adapter, args.out)
    print(f"adapter saved to {path}/")


if __name__ == "__main__":
    main()
