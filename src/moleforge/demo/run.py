"""``moleforge demo``: pretrain a small model, fine-tune S'MoRE, a flat mixture (MoLoRA) and a
LoRA of the same parameter budget on four synthetic tasks side by side, and write pictures, a
report and the adapters.

Everything is built here (model from a shipped config, tokenizer, data): no downloads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import compiler
from ..data import collate, encode_all
from ..errors import NotMergeableError
from ..interop.atomic import atomic_write
from ..interop.checkpoint import save
from ..interop.peft import export_merged
from ..report.structure import format_gamma
from ..specs import AdapterSpec, presets
from . import plots, report
from .loop import Curve, TaskScore, evaluate, finetune, pretrain
from .tasks import PRETRAIN_TASKS, TASKS, VOCAB, make_tokenizer, task_records

__all__ = ["DemoConfig", "MethodRun", "run_demo", "build_model", "matched_lora", "matched_molora"]


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo (the defaults finish in about a minute on two CPU cores)."""

    steps: int = 400            # fine-tuning steps per method
    pretrain_steps: int = 300   # full-model steps on the pretraining tasks
    batch: int = 32             # sequences per step
    lr: float = 3e-3            # adapters and pretraining alike
    seed: int = 0


@dataclass
class MethodRun:
    """One fine-tuned adapter: its spec, size, curve, and scores per task."""

    name: str
    spec: AdapterSpec
    parameters: int
    gamma: int | float
    """Γ: an exact int, or a :class:`~moleforge.report.structure.GammaEstimate` when huge."""
    curve: Curve
    scores: dict[str, TaskScore]
    adapter_dir: Path
    merged: Path | str
    """The merged model's folder, or why the adapter cannot be merged."""


def build_model() -> nn.Module:
    """The demo's causal LM, randomly initialised from ``demo/model_config.json``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(resources.files(__package__).joinpath("model_config.json").read_text())
    if cfg["vocab_size"] != len(VOCAB):
        raise RuntimeError(f"model_config.json has vocab_size {cfg['vocab_size']}, the demo vocabulary {len(VOCAB)}")
    config = AutoConfig.for_model(**cfg)
    return AutoModelForCausalLM.from_config(config)


def _closest_rank(budget: int, spec_of_rank: Callable[[int], AdapterSpec], model: nn.Module) -> int:
    """The rank whose spec's trainable parameter count is closest to ``budget`` (counts grow
    with the rank: a doubling search, then bisection)."""
    def count(rank: int) -> int:
        return compiler.count_parameters(spec_of_rank(rank), model)

    lo, hi = 1, 2
    while count(hi) < budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < budget else (lo, mid)
    return min((lo, hi), key=lambda r: abs(count(r) - budget))


def matched_lora(reference: AdapterSpec, model: nn.Module) -> tuple[AdapterSpec, int]:
    """A LoRA on the same projections as ``reference`` whose rank makes its trainable
    parameter count closest to ``reference``'s (alpha = 2·rank, as in the ``lora`` preset).
    Returns the spec and its rank."""
    target = reference.sites[0].target.model_dump(mode="json")

    def spec(rank: int) -> AdapterSpec:
        return AdapterSpec.model_validate({
            "name": f"lora-r{rank}",
            "description": f"LoRA r = {rank} on {', '.join(target['roles'] or target['modules'])}, "
                           f"matched to {reference.name}'s parameter budget",
            "sites": [{"target": target, "adapter": {"kind": "lora", "rank": rank, "alpha": 2 * rank}}]})

    rank = _closest_rank(compiler.count_parameters(reference, model), spec, model)
    return spec(rank), rank


def matched_molora(reference: AdapterSpec, model: nn.Module) -> tuple[AdapterSpec, int]:
    """The ``molora`` preset (8 experts, softmax top-2, Switch loss) on ``reference``'s
    projections, its expert rank chosen to match ``reference``'s parameter count (alpha = 2·rank).
    Returns the spec and the rank."""
    target = reference.sites[0].target.model_dump(mode="json")
    preset = presets.load("molora").model_dump(mode="json")

    def spec(rank: int) -> AdapterSpec:
        site = {**preset["sites"][0], "target": target}
        site["adapter"] = {**site["adapter"], "rank": rank, "alpha": 2 * rank}
        return AdapterSpec.model_validate({
            "name": f"molora-r{rank}",
            "description": f"MoLoRA, 8 rank-{rank} experts, top-2, on "
                           f"{', '.join(target['roles'] or target['modules'])}, "
                           f"matched to {reference.name}'s parameter budget",
            "sites": [site]})

    rank = _closest_rank(compiler.count_parameters(reference, model), spec, model)
    return spec(rank), rank


def _batches(records: list[dict], tokenizer, pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """One collated batch per task."""
    return {t: collate(encode_all([r for r in records if r["task"] == t], tokenizer, 64), pad_id) for t in TASKS}


def _export_merged(handle, path: Path, tokenizer) -> Path | str:
    """A merged HF model folder (with the tokenizer), or why the adapter does not merge."""
    try:
        export_merged(handle, path)
    except NotMergeableError:
        return "not mergeable: its routers choose experts per token"
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    atomic_write(path, write)


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), *, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the whole demo into ``out``; returns ``{what: path}`` of everything written.

    Uses one CPU thread while it runs: the model is far too small to gain from more, and
    threads contending on a busy machine cost more than they give.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out), config, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: DemoConfig, progress: bool, echo: Callable[[str], None]) -> dict[str, Path]:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(), make_tokenizer()
    pad = tokenizer.pad_token_id
    echo(f"model: {type(model).__name__} from moleforge/demo/model_config.json, "
         f"{sum(p.numel() for p in model.parameters()):,} parameters")

    records = task_records()
    examples = encode_all(records, tokenizer, 64)
    batches = _batches(records, tokenizer, pad)

    echo(f"pretraining every weight for {cfg.pretrain_steps} steps on the tasks {' '.join(PRETRAIN_TASKS)}")
    pre = pretrain(model, cfg.pretrain_steps, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed, progress=progress)
    base_scores = evaluate(model, batches)
    paths = {"base model": out / "base_model", "training data": out / "data" / "train.jsonl"}
    model.save_pretrained(paths["base model"])
    tokenizer.save_pretrained(paths["base model"])
    _write_jsonl(paths["training data"], records)

    smore = presets.load("smore")
    molora, molora_rank = matched_molora(smore, model)
    lora, rank = matched_lora(smore, model)
    runs, routing = [], None
    echo(f"fine-tuning adapters for {cfg.steps} steps on the new tasks {' '.join(TASKS)}")
    for name, spec in (("smore", smore), (f"molora r={molora_rank}", molora), (f"lora r={rank}", lora)):
        n, gamma = compiler.count_parameters(spec, model), compiler.structural_flexibility(spec)
        echo(f"  {name}: {n:,} trainable parameters, Γ = {format_gamma(gamma)}")
        handle = compiler.compile(spec, model)
        curve = finetune(handle, examples, cfg.steps, pad_id=pad, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed + 1,
                         desc=name.split()[0], progress=progress)
        scores = evaluate(model, batches)
        if routing is None:
            routing = plots.record_task_routing(handle, batches)
        adapter_dir = out / "adapters" / spec.name
        save(handle, adapter_dir)
        merged = _export_merged(handle, out / "merged" / spec.name, tokenizer)
        handle.remove()
        runs.append(MethodRun(name, spec, n, gamma, curve, scores, adapter_dir, merged))

    paths["loss curves"] = plots.loss_curves(out / "loss_curves.png", pre, runs, base_scores)
    paths["expert load"] = plots.expert_load(out / "expert_load.png", routing)
    paths["routing trees"] = plots.routing_trees(out / "routing_trees.png", routing)
    for r in runs:
        paths[f"adapter {r.name}"] = r.adapter_dir
        if isinstance(r.merged, Path):
            paths[f"merged model {r.name}"] = r.merged
    text = report.render(cfg, pre, base_scores, runs, time.perf_counter() - t_start)
    paths["report"] = report.write(out, text, cfg, pre, base_scores, runs)
    echo("")
    echo(text)
    return paths
