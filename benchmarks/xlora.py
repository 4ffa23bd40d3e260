"""X-LoRA inference forward: moleforge's ``xlora`` against PEFT's ``XLoraModel`` and the frozen base
model, the same three LoRAs and the same classifier weights, side by side in one run.

The model is the Llama of ``train_step.py`` (hidden 512, 4 layers, vocabulary ``--vocab``), random
weights, float32; three PEFT LoRAs (r = 8 on all 7 projections, A and B drawn) saved with PEFT;
the classifier of the ``xlora`` preset (depth 2, size 2048; PEFT's defaults otherwise), its weights
copied from PEFT's. One forward ``model(ids)`` of ``--batch`` x ``--seq`` tokens under
``torch.no_grad()`` in evaluation mode, ``torch.set_num_threads(--threads)``, timed in wall time or
in the process's CPU time (``--clock cpu``: less disturbed by other processes on a busy machine). Each timed forward of
an X-LoRA model runs right after one of the base; its ratio is the median over ``--rounds`` of its
time over that paired base forward, and the two X-LoRA models alternate which goes first. Both
run two passes (the base model, then the adapted one): moleforge skips the adapters in the first
pass (``scaling_pass_value`` 0), PEFT computes them with scalings 0.

    python benchmarks/xlora.py             # writes benchmarks/results/xlora.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import PROJECTIONS, build_base  # noqa: E402

import moleforge as mf  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402

EXPERTS, RANK, DEPTH, SIZE = 3, 8, 2, 2048


def make_loras(base: nn.Module, where: Path) -> list[Path]:
    import peft

    paths = []
    for i in range(EXPERTS):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=PROJECTIONS, lora_dropout=0.0, init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(0.1)  # small updates, as trained LoRAs
        model.save_pretrained(str(where / f"lora{i}"))
        paths.append(where / f"lora{i}")
    return paths


def build(base: nn.Module, paths: list[Path]) -> dict[str, nn.Module]:
    import peft

    peft_base = copy.deepcopy(base)
    peft_base.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, xlora_depth=DEPTH,
                              xlora_size=SIZE, adapters={str(i): str(p) for i, p in enumerate(paths)})
    peft_model = peft.get_peft_model(peft_base, config).eval()
    ours = copy.deepcopy(base)
    spec = {"name": "xlora", "sites": [{"target": {"roles": ["q", "k", "v", "o", "gate", "up", "down"]},
                                        "adapter": {"kind": "pool", "experts_from": [{"path": str(p)} for p in paths],
                                                    "router": {"kind": "xlora", "depth": DEPTH, "size": SIZE}}}]}
    handle = mf.compile(spec, ours)
    clf = peft_model.base_model.internal_xlora_classifier
    handle.load_state_dict({f"xlora_classifier.{k}": v for k, v in clf.state_dict().items()})
    return {"base": base.eval(), "moleforge_xlora": ours.eval(), "peft_xlora": peft_model}


CLOCK = time.perf_counter


def forward(model: nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        start = CLOCK()
        out = model(input_ids=ids, use_cache=False).logits
        return CLOCK() - start, out


def measure(models: dict[str, nn.Module], ids: torch.Tensor, rounds: int) -> dict[str, dict]:
    names = ["moleforge_xlora", "peft_xlora"]
    for m in models.values():
        forward(m, ids)  # warm up
    samples = {"base": {"s": []}, **{n: {"s": [], "base_s": []} for n in names}}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            b, _ = forward(models["base"], ids)
            t, _ = forward(models[name], ids)
            samples[name]["s"].append(t)
            samples[name]["base_s"].append(b)
            samples["base"]["s"].append(b)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (all its threads), which other "
                             "processes on a busy machine disturb less")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "xlora.json"))
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    base = build_base(args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        models = build(base, make_loras(base, Path(tmp)))
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    agree = float((forward(models["moleforge_xlora"], ids)[1] - forward(models["peft_xlora"], ids)[1]).abs().max())
    changed = float((forward(models["moleforge_xlora"], ids)[1] - forward(models["base"], ids)[1]).abs().max())
    print(f"max |logits moleforge - PEFT| = {agree:.2e}; max |logits X-LoRA - base| = {changed:.2e}")
    samples = measure(models, ids, args.rounds)
    results = {}
    for name, s in samples.items():
        ratios = [t / b for t, b in zip(s["s"], s["base_s"])] if "base_s" in s else [1.0]
        results[name] = {"ms": statistics.median(s["s"]) * 1e3, "ratio_to_base": statistics.median(ratios),
                         "ratios": ratios, "seconds": s["s"]}
        print(f"  {name:16s} {results[name]['ms']:9.2f} ms  {results[name]['ratio_to_base']:6.3f}x the base forward")
    mine, theirs = results["moleforge_xlora"]["ratio_to_base"], results["peft_xlora"]["ratio_to_base"]
    print(f"  moleforge / PEFT: {mine / theirs:.3f}")
    out = {
        "benchmark": "xlora_forward",
        "config": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "experts": EXPERTS, "rank": RANK,
                   "classifier_depth": DEPTH, "classifier_size": SIZE, "projections": PROJECTIONS,
                   "dtype": "float32", "threads": args.threads, "rounds": args.rounds, "clock": args.clock,
                   "model": "Llama hidden 512, 4 layers (benchmarks/train_step.py)"},
        "ratio": "median over rounds of (forward time / the base forward run just before it), in one run",
        "max_abs_logit_difference_moleforge_vs_peft": agree,
        "results": results,
        "moleforge_over_peft": mine / theirs,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": load_before, "load_average_now": list(os.getloadavg())},
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
