"""Layer-level speed of moleforge's S'MoRE against a same-rank LoRA and the frozen linear.

One adapted linear ``d_in -> d_out`` (both directions of an FFN: 512->1408 and 1408->512),
1024 tokens as a (4, 256, d_in) batch like inside a model, float32, forward + backward
(input and adapter parameters need gradients; the base weight is frozen). Variants, timed
interleaved in every repetition after a warm-up; ratios are medians over repetitions of the
ratio within one repetition (medians and minima of the times are reported too):

- ``frozen``: the base ``nn.Linear`` alone;
- ``lora``: base + a rank-``E·r`` LoRA (rank 64 for the default tree: the same total rank
  ``d_L = Σ_l s_l r_l``);
- ``smore``: base + moleforge's S'MoRE (switch gate, 4-4 experts, fanout 2-2, rank 8).

Also checks that moleforge's output equals the float64 reference interpreter.

    python benchmarks/smore_layer.py [--tokens 1024] [--reps 41] [--threads 2]

Writes ``benchmarks/results/smore_layer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import moleforge as mf
from moleforge.interop.atomic import atomic_write
from moleforge.ir import interpret

SHAPES = ((512, 1408), (1408, 512))


class Holder(nn.Module):
    """A model with one linear, the site the adapters go on."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base


class LoRALayer(nn.Module):
    """``y = base(x) + (x Aᵀ) Bᵀ``: the plain LoRA baseline."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T


def tree_spec(gate: str) -> mf.AdapterSpec:
    return mf.AdapterSpec(sites=[mf.Site(
        target=mf.Target(modules=["proj"]),
        adapter=mf.ResidualTree(levels=[mf.TreeLevel(experts=4, rank=8, fanout=2)] * 2, activation="tanh",
                                router=mf.TreeRouter(gate=gate, down_dim=32, key_dim=32),
                                aux_losses=[mf.SwitchLoadBalance(weight=0.01)]),
        init=mf.Init(up="normal", std=0.05, seed=0))])


def _step(fn, x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor]) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(grad)
    return time.perf_counter() - t0


def check_outputs(handle, model: Holder, x: torch.Tensor) -> float:
    """Max |moleforge - float64 interpreter| of Δy on the first 64 tokens."""
    site = handle.modules["proj"]
    graph = handle.graphs["proj"]
    params = {d.name: getattr(site.site, d.name).detach() for d in graph.params}
    xs = x.detach().reshape(-1, x.shape[-1])[:64]
    with torch.no_grad():
        got = model.proj(xs) - site.base_layer(xs)
    ref = interpret(graph, params, xs).output
    return float((got.double() - ref).abs().max())


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of ``a``'s time over ``b``'s in the same repetition (cancels the
    slow drifts of a shared machine's speed)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_shape(d_in: int, d_out: int, tokens: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    for p in base.parameters():
        p.requires_grad_(False)
    model = Holder(base)
    handle = mf.compile(tree_spec("switch"), model)
    model.train()
    lora = LoRALayer(base, rank=64)
    x = torch.randn(4, tokens // 4, d_in, requires_grad=True)
    grad = torch.randn(4, tokens // 4, d_out)
    variants = {
        "frozen": (base, []),
        "lora": (lora, [lora.A, lora.B]),
        "smore": (model.proj, list(handle.trainable_parameters())),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + reps):
        for name, (fn, params) in variants.items():
            t = _step(fn, x, grad, params)
            if i >= warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    model.eval()
    err = check_outputs(handle, model, x)
    return {
        "d_in": d_in, "d_out": d_out, "tokens": tokens,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "ratio_smore_over_lora": _paired(times, "smore", "lora"),
        "ratio_smore_over_frozen": _paired(times, "smore", "frozen"),
        "ratio_lora_over_frozen": _paired(times, "lora", "frozen"),
        "ratio_of_medians_smore_over_lora": med["smore"] / med["lora"],
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "ratio_smore_over_lora_of_minima": best["smore"] / best["lora"],
        "max_abs_err_vs_float64_interpreter": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "smore_layer.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [bench_shape(di, do, args.tokens, args.reps, args.warmup) for di, do in SHAPES]
    load_after = os.getloadavg()
    for r in results:
        m = r["median_ms"]
        print(f"{r['d_in']:>5} -> {r['d_out']:<5} frozen {m['frozen']:7.2f} ms   "
              f"lora-64 {m['lora']:7.2f} ms   "
              f"smore {m['smore']:7.2f} ms   smore/lora {r['ratio_smore_over_lora']:.2f}x   "
              f"smore/frozen {r['ratio_smore_over_frozen']:.2f}x   "
              f"(of minima: smore/lora {r['ratio_smore_over_lora_of_minima']:.2f}x)   "
              f"max err vs interpreter {r['max_abs_err_vs_float64_interpreter']:.1e}")
    report = {
        "setting": {"tokens": args.tokens, "reps": args.reps, "warmup": args.warmup, "threads": args.threads,
                    "dtype": "float32", "tree": "switch gate, experts 4-4, fanout 2-2, rank 8, tanh",
                    "lora_rank": 64,
                    "timing": "forward + backward, variants interleaved; ratios: median of per-rep ratios"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1_5_15min": {"before": load_before, "after": load_after}},
        "results": results,
    }
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
