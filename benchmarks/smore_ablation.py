"""Why S'MoRE trails in ``moleforge demo``: each default of the ``smore`` preset changed alone.

The demo's setting exactly: its small Llama pretrained on four counting tasks, then an adapter
fine-tuned 400 steps (AdamW, warmup + cosine, batch 32) on four new tasks; score = exact match
and loss per answer token on the tasks' prompts. For each variant and seed the script records:

- the final exact match and loss, and the loss curve (every 25 steps);
- gate entropy (nats, mean over sites and pools) and the largest expert share over training,
  from ``handle.record_routing()`` on the evaluation batches;
- the gradient norm of each parameter group (A, B and W per level, the final projection, the
  router) averaged over the first 50 steps, and the norm of each group's update in function
  space (how far one step moves the site outputs).

    python benchmarks/smore_ablation.py                       # all variants, seeds 0 1 2
    python benchmarks/smore_ablation.py --variants smore lora --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import moleforge as mf  # noqa: E402
from moleforge.data import collate, encode_all  # noqa: E402
from moleforge.demo.loop import _schedule, evaluate, pretrain  # noqa: E402
from moleforge.demo.run import build_model, matched_lora  # noqa: E402
from moleforge.demo.tasks import TASKS, make_tokenizer, task_records  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402

STEPS, BATCH, LR = 400, 32, 3e-3


def _smore(**change) -> dict:
    spec = mf.presets.load("smore").model_dump(mode="json")
    adapter = spec["sites"][0]["adapter"]
    for path, value in change.items():
        node = adapter
        *head, last = path.split("__")
        for key in head:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return spec


def variants(model) -> dict[str, dict]:
    """``{name: spec}``: the preset, one default changed at a time, and the baselines."""
    lora, rank = matched_lora(mf.presets.load("smore"), model)
    alpha16 = [{"experts": 4, "rank": 8, "fanout": 2, "alpha": 16}] * 2
    return {
        "smore": _smore(),
        "smore_no_aux": _smore(aux_losses=[]),
        "smore_aux_0.001": _smore(aux_losses=[{"kind": "switch_lb", "weight": 0.001}]),
        "smore_alpha_2r": _smore(levels=alpha16),
        "smore_identity": _smore(activation="identity"),
        "smore_temperature_0.5": _smore(router__temperature=0.5),
        "smore_key_dim_8": _smore(router__key_dim=8),
        "smore_no_aux_alpha_2r": _smore(aux_losses=[], levels=alpha16),
        "smore_dense": mf.presets.load("smore_dense").model_dump(mode="json"),
        "smore_w_final_zero": (_smore(), w_final_zero),
        "smore_w_final_zero_no_aux": (_smore(aux_losses=[]), w_final_zero),
        f"lora_r{rank}": lora.model_dump(mode="json"),
        "lora_r16": _lora(lora, 16),
        "lora_r64": _lora(lora, 64),
        "molora_ffn": _molora_ffn(),
    }


@torch.no_grad()
def w_final_zero(handle, seed: int) -> None:
    """The official code's ``w_final_zero`` start: the final projection zero, every ``B``
    Kaiming-uniform (as ``A``), so the tree's hidden state is non-zero from the first step and
    the final projection learns from zero the way LoRA's ``B`` does."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in handle.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "proj_w":
            p.zero_()
        elif re.fullmatch(r"B\d", leaf):
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))


def _lora(spec, rank: int) -> dict:
    """``spec`` (a LoRA) at ``rank``, alpha = 2·rank."""
    out = spec.model_dump(mode="json")
    out["name"] = f"lora-r{rank}"
    out["sites"][0]["adapter"].update(rank=rank, alpha=2 * rank)
    return out


def _molora_ffn() -> dict:
    spec = mf.presets.load("molora").model_dump(mode="json")
    spec["sites"][0]["target"] = {"roles": ["gate", "up", "down"]}
    return spec


def _group(name: str) -> str:
    """Parameter group of a site parameter: ``A0``, ``B1``, ``W1``, ``proj``, ``router``, ``lora``..."""
    leaf = name.rsplit(".", 1)[-1]
    if re.fullmatch(r"[ABW]\d", leaf):
        return leaf
    if leaf.startswith("proj"):
        return "proj"
    if leaf.startswith(("keys", "query", "down", "noise", "router", "W_g")):
        return "router"
    return leaf.split("_")[0]


def _routing_stats(handle, batches) -> dict | None:
    with torch.no_grad(), handle.record_routing() as log:
        for b in batches.values():
            handle.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ent = [e for pools in log.entropy().values() for e in pools]
    loads = [float(v.max()) for pools in log.expert_load().values() for v in pools]
    if not ent:
        return None
    return {"entropy": statistics.mean(ent), "max_share": statistics.mean(loads)}


def finetune(base, spec: dict, seed: int, lr: float, examples, batches, pad: int) -> dict:
    model = copy.deepcopy(base)
    spec, post = spec if isinstance(spec, tuple) else (spec, None)
    spec = mf.AdapterSpec.model_validate(spec).with_init(mf.Init(seed=seed))
    handle = mf.compile(spec, model)
    if post is not None:
        post(handle, seed)
    params = list(handle.trainable_parameters())
    names = {id(p): n for n, p in handle.named_parameters()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(STEPS, warmup=max(1, STEPS // 20)))
    gen = torch.Generator().manual_seed(seed + 1)
    grads: dict[str, list[float]] = {}
    curve, routing = [], {0: _routing_stats(handle, batches)}
    model.train()
    t0 = time.perf_counter()
    for step in range(STEPS):
        pick = torch.randint(0, len(examples), (BATCH,), generator=gen).tolist()
        out = model(**collate([examples[i] for i in pick], pad))
        out.loss.backward()
        if step < 50:
            sq: dict[str, float] = {}
            for p in params:
                g = _group(names[id(p)])
                sq[g] = sq.get(g, 0.0) + float(p.grad.pow(2).sum())
            for g, v in sq.items():
                grads.setdefault(g, []).append(math.sqrt(v))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        handle.update_balancing()
        if step % 25 == 24:
            aux = handle.aux_loss()
            curve.append(out.loss.item() - (0.0 if aux is None else aux.item()))
        if step + 1 in (100, 200, STEPS):
            model.eval()
            routing[step + 1] = _routing_stats(handle, batches)
            model.train()
    seconds = time.perf_counter() - t0
    scores = evaluate(model, batches)
    return {"exact": statistics.mean(s.exact for s in scores.values()),
            "loss": statistics.mean(s.loss for s in scores.values()),
            "per_task": {t: {"exact": s.exact, "loss": s.loss} for t, s in scores.items()},
            "parameters": mf.count_parameters(spec, base), "start": getattr(post, "__name__", "preset"), "curve": curve,
            "routing": routing if routing[0] is not None else None,
            "grad_norm_first_50": {g: statistics.mean(v) for g, v in grads.items()},
            "ms_per_step": 1e3 * seconds / STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="*", type=float, default=[LR])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smore_ablation.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine runs (other seeds or variants) into --out")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(m).read_text()) for m in args.merge]
        results: dict[str, dict] = {}
        for part in parts:
            if (part["steps"], part["batch"]) != (STEPS, BATCH):
                raise SystemExit("merge runs of the same steps and batch only")
            for key, entry in part["results"].items():
                results.setdefault(key, {"runs": {}})["runs"].update(entry["runs"])
        seeds = sorted({int(s) for e in results.values() for s in e["runs"]})
        return _write(results, seeds, args)
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    pad = tokenizer.pad_token_id
    records = task_records()
    examples = encode_all(records, tokenizer, 64)
    batches = {t: collate(encode_all([r for r in records if r["task"] == t], tokenizer, 64), pad) for t in TASKS}
    results: dict[str, dict] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = build_model()
        pretrain(base, 300, batch=BATCH, lr=LR, seed=seed, progress=False)
        for p in base.parameters():
            p.requires_grad_(False)
        table = variants(base)
        for name in args.variants or table:
            for lr in args.lrs:
                key = name if len(args.lrs) == 1 else f"{name}@{lr:g}"
                run = finetune(base, table[name], seed, lr, examples, batches, pad)
                results.setdefault(key, {"runs": {}})["runs"][seed] = run
                print(f"seed {seed} {key:28s} exact {run['exact']:.3f} loss {run['loss']:.4f} "
                      f"params {run['parameters']:,} grads "
                      f"{json.dumps({g: round(v, 4) for g, v in run['grad_norm_first_50'].items()})}",
                      flush=True)
    _write(results, args.seeds, args)


def _write(results: dict, seeds: list[int], args) -> None:
    for entry in results.values():
        entry["runs"] = {str(k): v for k, v in sorted(entry["runs"].items(), key=lambda kv: int(kv[0]))}
        runs = list(entry["runs"].values())
        entry["exact_mean"] = statistics.mean(r["exact"] for r in runs)
        entry["exact_spread"] = (max(r["exact"] for r in runs) - min(r["exact"] for r in runs)) / 2
        entry["loss_mean"] = statistics.mean(r["loss"] for r in runs)
        entry["exact_sd"] = statistics.stdev(r["exact"] for r in runs) if len(runs) > 1 else 0.0
    payload = {"benchmark": "smore_ablation", "steps": STEPS, "batch": BATCH, "seeds": seeds,
               "lr": f"{LR:g} unless the variant's name ends in @<lr>",
               "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
               "results": results}
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    print(f"{'variant':30s} seeds  exact (mean ± sd)  loss   " + "  ".join(f"seed {s}" for s in seeds))
    for key, e in results.items():
        per = "  ".join(f"{e['runs'][str(s)]['exact']:.3f} " if str(s) in e["runs"] else "   -   " for s in seeds)
        print(f"{key:30s} {len(e['runs']):>5}  {e['exact_mean']:.3f} ± {e['exact_sd']:.3f}  {e['loss_mean']:.4f} {per}")


if __name__ == "__main__":
    main()
