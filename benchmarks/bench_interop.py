"""Merged export: what folding the adapter into the weights buys at inference, and what the
exports cost. Side by side in one run, on a small Llama built from a config (CPU by default):

- forward latency of the adapted model (base + adapter sites) against the merged model that
  ``AutoModelForCausalLM.from_pretrained`` reloads, and against the bare base model;
- wall time of ``mf.export_merged`` and ``mf.export_peft``;
- the largest logit difference between the adapted and the merged model.

Writes ``benchmarks/results/interop.json``. Usage: ``python benchmarks/bench_interop.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import moleforge as mf


def _model(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=1000)
    return tf.LlamaForCausalLM(config).eval()


def _spec() -> mf.AdapterSpec:
    """LoRA on attention, a CAT-style static pool of 4 rank-8 experts on the FFN."""
    return mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=["q", "k", "v", "o"]), adapter=mf.LoRA(rank=16, alpha=32)),
        mf.Site(target=mf.Target(roles=["gate", "up", "down"]),
                adapter=mf.ExpertPool(experts=4, rank=8, router=mf.StaticRouter())),
    ]).with_init(mf.Init(up="normal", std=0.02, seed=1))


def _latency(model, ids, device: str, repeats: int) -> float:
    """Median seconds per forward (after warm-up), synchronised on CUDA; the best of 3 rounds is kept."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    ids = torch.randint(0, 1000, (4, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)

    base = _model().to(args.device)
    adapted = _model().to(args.device)
    handle = mf.compile(_spec(), adapted)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mf.export_merged(handle, Path(tmp) / "merged")
        t_merged = time.perf_counter() - t
        t = time.perf_counter()
        mf.export_peft(handle, Path(tmp) / "peft")
        t_peft = time.perf_counter() - t
        merged = tf.AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged").to(args.device).eval()

    with torch.no_grad():
        diff = (adapted(ids).logits - merged(ids).logits).abs().max().item()
    models = {"base": base, "adapted": adapted, "merged": merged}
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(3):  # interleaved rounds: load from other processes hits every model alike
        for name, m in models.items():
            samples[name].append(_latency(m, ids, args.device, args.repeats))
    lat = {name: min(v) for name, v in samples.items()}
    result = {
        "device": args.device, "batch": list(ids.shape), "sites": len(handle.modules),
        "latency_s": lat,
        "adapted_over_merged": lat["adapted"] / lat["merged"],
        "merged_over_base": lat["merged"] / lat["base"],
        "export_merged_s": t_merged, "export_peft_s": t_peft, "max_logit_diff": diff,
    }
    out = Path(__file__).parent / "results" / "interop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
