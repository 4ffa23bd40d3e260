"""DynMoLE's variable-k routing against MoLoRA's top-k at the same E and mean k, on one adapted
linear: forward + backward time of the lowered site, side by side in one run.

One site ``d_in = 512 -> d_out = 1408`` (the FFN up projection of ``train_step.py``'s Llama),
``T = 1024`` tokens, E = 8 experts of rank 8, float32, ``torch.set_num_threads(2)``. DynMoLE's
router at p = 0.8 (least k 1, no entropy broadcast) reads router weights scaled by ``--sharpness``
so that its routing is as peaked as a trained router's; its mean experts per token on the input
is measured first, and MoLoRA (softmax top-k, renormalised) runs with k that mean, rounded.
Both run in the two kernel forms the compiler chooses between: ``grouped`` (only the routed
(token, expert) pairs, ``group_pools``; DynMoLE's pairs come from its non-zero gates) and
``stacked`` (the block-gated dense form, ``stack_pools``). Variants are interleaved step by
step; the ratio is the median over rounds of DynMoLE's step time over MoLoRA's in the same round.

    python benchmarks/dynmole_site.py     # writes benchmarks/results/dynmole_site.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moleforge.backends.torch_fx.init import ParamStore  # noqa: E402
from moleforge.backends.torch_fx.lower import lower  # noqa: E402
from moleforge.compiler.build import SiteShape, build_graph  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402
from moleforge.passes import group_pools, stack_pools  # noqa: E402
from moleforge.specs import ExpertPool, TopKRouter, TopPRouter  # noqa: E402

D_IN, D_OUT, E, R, T = 512, 1408, 8, 8, 1024


def site(router, form, sharpness: float):
    graph = build_graph(ExpertPool(experts=E, rank=R, alpha=16, router=router), SiteShape("up", D_IN, D_OUT))
    graph = group_pools(graph) if form == "grouped" else stack_pools(graph)
    store = ParamStore(graph.params, up="normal", std=0.02, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        store.router_w.mul_(sharpness)
    return lower(graph, store).train()


def step(gm, x) -> float:
    t = time.perf_counter()
    y, aux, _ = gm(x)
    (y.square().mean() + (aux if aux is not None else 0.0)).backward()
    for p in gm.parameters():
        p.grad = None
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sharpness", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynmole_site.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    x = torch.randn(T, D_IN, generator=torch.Generator().manual_seed(1))
    dyn = TopPRouter(p=0.8, k=1, entropy_threshold=1.0)
    with torch.no_grad():
        gates = site(dyn, "stacked", args.sharpness).eval()(x)[2]["route"].gates
    mean_k = float((gates != 0).sum(1).float().mean())
    k = max(1, round(mean_k))
    print(f"DynMoLE p = 0.8 routes {mean_k:.2f} experts per token; MoLoRA runs top-{k}")
    variants = {f"{name}_{form}": site(router, form, args.sharpness) for form in ("grouped", "stacked")
                for name, router in (("dynmole_p08", dyn), (f"molora_k{k}", TopKRouter(k=k)))}
    times = {v: [] for v in variants}
    for r in range(args.rounds + 2):
        order = list(variants)[r % 4:] + list(variants)[:r % 4]
        for v in order:
            t = step(variants[v], x)
            if r >= 2:
                times[v].append(t)
    out = {"benchmark": "dynmole_site", "shape": {"d_in": D_IN, "d_out": D_OUT, "experts": E, "rank": R, "tokens": T},
           "dynmole_mean_experts_per_token": mean_k, "molora_k": k, "sharpness": args.sharpness,
           "median_ms": {v: statistics.median(t) * 1e3 for v, t in times.items()}, "ratios": {},
           "environment": {"torch": torch.__version__, "threads": args.threads, "cores": os.cpu_count(),
                           "load_average_before": load_before, "load_average_after": list(os.getloadavg())}}
    for form in ("grouped", "stacked"):
        a, b = times[f"dynmole_p08_{form}"], times[f"molora_k{k}_{form}"]
        out["ratios"][f"dynmole_over_molora_{form}"] = statistics.median(x / y for x, y in zip(a, b))
    for v, ms in out["median_ms"].items():
        print(f"{v:24s} {ms:9.1f} ms")
    for name, ratio in out["ratios"].items():
        print(f"{name:34s} {ratio:.3f}x")
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
