"""MixLoRA with DoRA experts (``use_dora``): what the magnitudes cost a training step and an evaluation
forward, against the same adapter without DoRA and against the ``mixlora`` package's DoRA.

    python benchmarks/mixlora_dora.py [--steps 5]

The model, batch and adapter of ``benchmarks/mixlora_block.py`` (a 4-layer Llama of width 512, batch
4 × 256 tokens, float32, 2 threads; MixLoRA E = 8, top-2, r = 8 on gate/up/down, LoRA r = 8 on
q/k/v/o), imported once with ``use_dora`` true and once false (dropout 0.05 both). Timed, interleaved
step by step:

- a training step (forward + backward): moleforge with and without DoRA, and the package's injection
  of the same DoRA adapter (its ``LoraLinear.apply_dora`` on every expert LoRA);
- an evaluation forward under ``torch.no_grad()``: moleforge with and without DoRA (DoRA blocks run
  the torch ops, the plain ones the compiled CPU kernel; the experts' norms are kept between calls).

Medians and their ratios are printed and written to ``benchmarks/results/mixlora_dora.json`` with
the load average of the (shared) machine before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixlora_block import BATCH, SEQ, base_model, package_model, write_adapter  # noqa: E402
from mixlora_dropout import _train, eval_forward, interleaved, train_step  # noqa: E402

import moleforge as mf  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402


def _with_dora(directory: Path, dora: bool) -> Path:
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "use_dora": dora}))
    return directory


def _imported(vocab: int, directory: Path, dora: bool):
    model = base_model(vocab)
    mf.import_mixlora(model, _with_dora(directory, dora)).seed_noise(0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mixlora_dora.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, args.vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(Path(tmp))
        dora, plain = _imported(args.vocab, Path(tmp), True), _imported(args.vocab, Path(tmp), False)
        theirs = package_model(args.vocab, _with_dora(Path(tmp), True))
    trains = {"train_moleforge_dora": (train_step, _train(dora)), "train_moleforge_lora": (train_step, _train(plain)),
              "train_mixlora_package_dora": (train_step, _train(theirs))}
    evals = {"eval_moleforge_dora": (eval_forward, dora), "eval_moleforge_lora": (eval_forward, plain)}
    load_before = os.getloadavg()
    times = interleaved(trains, ids, args.steps, args.warmup, time.perf_counter)
    for model in (dora, plain):
        model.eval()
    times |= interleaved(evals, ids, args.steps, args.warmup, time.perf_counter)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"train: DoRA / LoRA experts": med["train_moleforge_dora"] / med["train_moleforge_lora"],
              "train: package DoRA / moleforge DoRA": med["train_mixlora_package_dora"] / med["train_moleforge_dora"],
              "eval: DoRA / LoRA experts": med["eval_moleforge_dora"] / med["eval_moleforge_lora"]}
    result = {
        "benchmark": "mixlora_dora", "what": "train step (forward+backward) and no-grad eval forward, median s",
        "model": {"tokens": BATCH * SEQ, "vocab": args.vocab, "dtype": "float32", "as": "benchmarks/mixlora_block.py"},
        "threads": 2, "steps": args.steps, "warmup": args.warmup,
        "load_average_1min": {"before": load_before[0], "after": load_after[0], "cpus": os.cpu_count()},
        "median_s": med, "ratios": ratios, "all_s": times,
        "versions": {"torch": torch.__version__, "transformers": tf.__version__, "moleforge": mf.__version__},
    }
    for k, v in med.items():
        print(f"{k:>30}: {v * 1000:8.1f} ms")
    for k, v in ratios.items():
        print(f"{k:>40}: x{v:.3f}")
    print(f"load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    os.makedirs(Path(args.out).parent, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
