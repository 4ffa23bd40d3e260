"""Greedy generation with each adapter, time per new token as ratios to the base model.

``model.generate(ids, max_new_tokens=32, do_sample=False)`` under ``torch.no_grad()`` in
evaluation mode (the KV cache on), batch 1 and batch 8 (8 prompts of 16 tokens), float32,
``torch.set_num_threads(--threads)``. Models:

- ``llama``: the Llama of ``train_step.py`` (hidden 512, 4 layers), vocabulary ``--vocab`` (2048 by
  default, so that the LM head does not hide the adapters), random weights;
- ``smollm2``: SmolLM2-135M-Instruct (30 layers, ``moleforge.pretrained.load_smollm2``), when it
  is installed.

Configurations: ``base`` (no adapter); ``peft_lora_r16`` (PEFT LoRA r = 16 on all 7 projections,
unmerged); moleforge ``lora`` (r = 8, all 7), ``molora``, ``mixlora`` and ``smore``, each with
non-zero up-projections. Each timed generation of a configuration runs right after one of the
base, and its ratio is the median over ``--rounds`` rounds of its time over that paired base
generation; configurations rotate their order round by round. Compare ratios within one run.

    python benchmarks/generate.py             # writes benchmarks/results/generate.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
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

PRESETS = ["lora", "molora", "mixlora", "smore"]
BATCHES = (1, 8)
PROMPT = 16


def _peft(base: nn.Module) -> nn.Module:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS,
                                                                      lora_dropout=0.0))
    with torch.no_grad():  # non-zero up-projections, as the moleforge adapters'
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


def _moleforge(base: nn.Module, preset: str) -> nn.Module:
    model = copy.deepcopy(base)
    mf.compile(mf.presets.load(preset).with_init(mf.Init(up="normal", std=0.02, seed=0)), model)
    return model.eval()


def build_configs(base: nn.Module, only: set[str] | None) -> dict[str, nn.Module]:
    base.eval()
    base.generation_config.eos_token_id = None  # always 32 new tokens
    configs: dict[str, nn.Module] = {"base": base}
    if only is None or "peft_lora_r16" in only:
        configs["peft_lora_r16"] = _peft(base)
    for preset in PRESETS:
        if only is None or preset in only:
            configs[preset] = _moleforge(base, preset)
    return configs


def generate(model: nn.Module, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy generation of ``new`` tokens, and the tokens."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
        return time.perf_counter() - start, out[:, ids.shape[1]:]


def measure(configs: dict[str, nn.Module], ids: torch.Tensor, new: int, rounds: int) -> dict[str, dict]:
    names = [n for n in configs if n != "base"]
    for model in configs.values():
        generate(model, ids, 4)  # warm up: allocations, packed weights
    samples: dict[str, dict] = {"base": {"s": []}, **{n: {"s": [], "base_s": []} for n in names}}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            base_s, _ = generate(configs["base"], ids, new)
            t, _ = generate(configs[name], ids, new)
            samples[name]["s"].append(t)
            samples[name]["base_s"].append(base_s)
            samples["base"]["s"].append(base_s)
    return samples


def summarise(samples: dict[str, dict], new: int, batch: int) -> dict[str, dict]:
    out = {}
    for name, s in samples.items():
        ratios = [t / b for t, b in zip(s["s"], s["base_s"])] if "base_s" in s else [1.0]
        out[name] = {"ms_per_token": statistics.median(s["s"]) * 1e3 / new, "ratio_to_base": statistics.median(ratios),
                     "ratios": ratios, "seconds": s["s"]}
        print(f"  batch {batch}  {name:16s} {out[name]['ms_per_token']:8.2f} ms/token  "
              f"{out[name]['ratio_to_base']:6.3f}x")
    return out


def run_model(label: str, base: nn.Module, vocab: int, args, batches: list[int], results: dict, save) -> None:
    """Every configuration of ``base`` at each batch size, into ``results``; ``save()`` after each
    (a long run keeps what it measured)."""
    print(f"\n{label}")
    configs = build_configs(base, set(args.only) if args.only else None)
    for batch in batches:
        ids = torch.randint(1, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        results[f"batch_{batch}"] = summarise(measure(configs, ids, args.new, args.rounds), args.new, batch)
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed generations per configuration (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--vocab", type=int, default=2048,
                        help="the train-step Llama's vocabulary (small: the LM head does not hide the adapters)")
    parser.add_argument("--models", nargs="*", default=["llama", "smollm2"])
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--smollm2-batches", nargs="*", type=int, default=None,
                        help="batch sizes for SmolLM2 (default: --batches)")
    parser.add_argument("--only", nargs="*", help="configurations to run (the base always runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    models: dict = {}

    def save() -> None:
        result = {
            "benchmark": "generate",
            "config": {"new_tokens": args.new, "prompt_tokens": PROMPT, "dtype": "float32", "threads": args.threads,
                       "rounds": args.rounds, "greedy": True, "kv_cache": True},
            "ratio": "median over rounds of (generation time / the base generation run just before it), in one run",
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "load_average_before": load_before, "load_average_now": list(os.getloadavg())},
            "models": models,
        }
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))

    if "llama" in args.models:
        models[f"llama_vocab{args.vocab}"] = {}
        run_model(f"train-step Llama, vocabulary {args.vocab}", build_base(args.vocab), args.vocab, args,
                  args.batches, models[f"llama_vocab{args.vocab}"], save)
    if "smollm2" in args.models:
        try:
            from moleforge.pretrained import load_smollm2
            model, tok = load_smollm2()
        except ImportError as e:
            print(f"\nSmolLM2-135M skipped: {e}")
        else:
            batches = args.smollm2_batches if args.smollm2_batches is not None else args.batches
            models["smollm2_135m"] = {}
            run_model("SmolLM2-135M-Instruct", model, len(tok), args, batches, models["smollm2_135m"], save)
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
