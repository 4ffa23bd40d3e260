"""MixLoRA with LoRA dropout: what the dropout costs a training step, and that evaluation pays nothing.

    python benchmarks/mixlora_dropout.py [--steps 7]

The model, batch and adapter of ``benchmarks/mixlora_block.py`` (a 4-layer Llama of width 512, batch
4 × 256 tokens, float32, 2 threads; MixLoRA E = 8, top-2, r = 8 on gate/up/down, LoRA r = 8 on
q/k/v/o), imported with ``lora_dropout`` 0.05 (on the FFN blocks and the attention LoRAs, as the
package applies it), with 0, and with 0.05 on the FFN blocks only (the attention LoRAs at 0, so
that only the blocks' dropout differs from the model without). Timed, interleaved step by step:

- a training step (``model.train()``, forward + backward): the three moleforge models, and the
  ``mixlora`` package's injection of the same adapter in training mode (its dropout 0.05; the
  package refuses 0);
- an evaluation forward under ``torch.no_grad()`` (the inference path): blocks' dropout 0.05 against
  0, which must cost the same (no mask is drawn).

Medians and their ratios are printed and written to ``benchmarks/results/mixlora_dropout.json`` with
the load average; then, unless ``--cpu-steps 0``, the minimum CPU time of the same steps on one
thread, which other processes on the machine disturb less.
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

import moleforge as mf  # noqa: E402


def _train(model):
    model.train()
    for layer in getattr(getattr(model, "model", None), "layers", []):  # the package's experts sit outside the tree
        for moe in getattr(layer.mlp, "mixlora_moes", {}).values():
            for expert in moe.experts_.values():
                expert.train()
    return model


def train_step(model, ids: torch.Tensor, clock) -> float:
    for p in model.parameters():
        p.grad = None
    t0 = clock()
    model(input_ids=ids, labels=ids).loss.backward()
    return clock() - t0


def eval_forward(model, ids: torch.Tensor, clock) -> float:
    t0 = clock()
    with torch.no_grad():
        model(input_ids=ids)
    return clock() - t0


def interleaved(variants: dict, ids: torch.Tensor, rounds: int, warmup: int, clock) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + rounds):
        for name, (run, model) in variants.items():
            t = run(model, ids, clock)
            if i >= warmup:
                times[name].append(t)
    return times


def _imported(vocab: int, directory: Path, dropout: float, blocks_only: bool = False):
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": dropout}))
    model = base_model(vocab)
    handle = mf.import_mixlora(model, directory)
    if blocks_only:  # the same adapter, its attention LoRAs without dropout
        sites = [s if s.scope == "ffn_block" else s.model_copy(update={"adapter": s.adapter.model_copy(
            update={"dropout": 0.0})}) for s in handle.spec.sites]
        state = handle.state_dict()
        handle.remove()
        handle = mf.compile(handle.spec.model_copy(update={"sites": sites}), model)
        handle.load_state_dict(state)
    handle.seed_noise(0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--cpu-steps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mixlora_dropout.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, args.vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(Path(tmp))
        dropped, blocks = _imported(args.vocab, Path(tmp), 0.05), _imported(args.vocab, Path(tmp), 0.05, True)
        plain = _imported(args.vocab, Path(tmp), 0.0)
        theirs = package_model(args.vocab, _package_dir(Path(tmp)))
    variants = {"train_moleforge_dropout_0.05": (train_step, _train(dropped)),
                "train_moleforge_block_dropout_0.05": (train_step, _train(blocks)),
                "train_moleforge_dropout_0": (train_step, _train(plain)),
                "train_mixlora_package_dropout_0.05": (train_step, _train(theirs))}
    evals = {"eval_moleforge_block_dropout_0.05": (eval_forward, blocks),
             "eval_moleforge_dropout_0": (eval_forward, plain)}
    load_before = os.getloadavg()
    times = interleaved(variants, ids, args.steps, args.warmup, time.perf_counter)
    for model in (blocks, plain):
        model.eval()
    times |= interleaved(evals, ids, args.steps, args.warmup, time.perf_counter)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = _ratios(med)
    cpu = {}
    if args.cpu_steps:
        torch.set_num_threads(1)
        for model in (dropped, blocks, plain):
            _train(model)
        cpu = {k: min(v) for k, v in interleaved(variants, ids, args.cpu_steps, 1, time.thread_time).items()}
        for model in (blocks, plain):
            model.eval()
        cpu |= {k: min(v) for k, v in interleaved(evals, ids, args.cpu_steps, 1, time.thread_time).items()}
    result = {
        "benchmark": "mixlora_dropout", "what": "train step (forward+backward) and no-grad eval forward, median s",
        "model": {"tokens": BATCH * SEQ, "vocab": args.vocab, "dtype": "float32", "as": "benchmarks/mixlora_block.py"},
        "threads": 2, "steps": args.steps, "warmup": args.warmup,
        "load_average_1min": {"before": load_before[0], "after": load_after[0], "cpus": os.cpu_count()},
        "median_s": med, "ratios": ratios, "all_s": times,
        "cpu_time_1_thread_min_s": cpu,
        "cpu_ratios": _ratios(cpu) if cpu else {},
        "versions": {"torch": torch.__version__, "transformers": tf.__version__, "moleforge": mf.__version__},
    }
    for k, v in med.items():
        print(f"{k:>36}: {v * 1000:8.1f} ms" + (f"   CPU 1 thread {cpu[k] * 1000:8.1f} ms" if k in cpu else ""))
    for k, v in ratios.items():
        print(f"{k:>46}: x{v:.3f}")
    for k, v in result["cpu_ratios"].items():
        print(f"{'CPU ' + k:>46}: x{v:.3f}")
    print(f"load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    os.makedirs(Path(args.out).parent, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _ratios(t: dict[str, float]) -> dict[str, float]:
    return {"train: blocks' dropout 0.05 / dropout 0":
            t["train_moleforge_block_dropout_0.05"] / t["train_moleforge_dropout_0"],
            "train: all dropout 0.05 / dropout 0": t["train_moleforge_dropout_0.05"] / t["train_moleforge_dropout_0"],
            "train: package / moleforge, both dropout 0.05":
            t["train_mixlora_package_dropout_0.05"] / t["train_moleforge_dropout_0.05"],
            "eval: blocks' dropout 0.05 / dropout 0":
            t["eval_moleforge_block_dropout_0.05"] / t["eval_moleforge_dropout_0"]}


def _package_dir(directory: Path) -> Path:
    """The adapter with the package's dropout 0.05 (``_imported`` rewrote the config last with 0)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.05}))
    return directory


if __name__ == "__main__":
    main()
