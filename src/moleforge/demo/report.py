"""The demo's text report (``report.txt``) and the same numbers as JSON (``report.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..interop.atomic import atomic_write
from ..report.structure import format_gamma
from .tasks import PRETRAIN_TASKS, TASKS

__all__ = ["render", "write", "final_loss", "verdict"]


def final_loss(losses: list[float], last: int = 20) -> float:
    """Mean training loss over the last ``last`` steps (one step alone is noisy)."""
    tail = losses[-last:]
    return sum(tail) / max(1, len(tail))


def _row(label: str, values: list[str], width: int = 18) -> str:
    return f"  {label:<24}" + "".join(f"{v:>{width}}" for v in values)


def render(cfg, pre, base_scores, runs, seconds: float) -> str:
    """The report as text: setup, one column per method, scores per task."""
    names = [r.name for r in runs]
    lines = [
        "moleforge demo: S'MoRE, a flat mixture (MoLoRA) and LoRA at one parameter budget, fine-tuned side by side",
        "",
        f"base model   pretrained {cfg.pretrain_steps} steps on the tasks {' '.join(PRETRAIN_TASKS)} "
        f"(loss {final_loss(pre.loss[:20]):.3f} -> {final_loss(pre.loss):.3f})",
        f"new tasks    {' '.join(TASKS)}: count on from a start digit, e.g. '+2 7' -> '9 1 3 5' "
        "(10 prompts per task)",
        f"fine-tuning  {cfg.steps} steps per method, batch {cfg.batch}, AdamW lr {cfg.lr:g}, "
        "only adapter weights train",
        "",
        _row("", names),
        _row("trainable parameters", [f"{r.parameters:,}" for r in runs]),
        _row("structures per token Γ", [format_gamma(r.gamma) for r in runs]),
        _row("final training loss", [f"{final_loss(r.curve.loss):.4f}" for r in runs]),
        _row("final aux loss", [f"{final_loss(r.curve.aux):.4f}" if any(r.curve.aux) else "-" for r in runs]),
        _row("time per step", [f"{r.curve.ms_per_step:.1f} ms" for r in runs]),
        _row("merged export", ["merged/" + r.merged.name if isinstance(r.merged, Path) else "no" for r in runs]),
        *[f"  ({r.name} is {r.merged}; it stays a moleforge adapter)" for r in runs if not isinstance(r.merged, Path)],
        "",
        "per task: loss per answer token / prompts answered exactly right",
        _row("", ["base model"] + names),
    ]
    for task in TASKS:
        cells = [base_scores[task]] + [r.scores[task] for r in runs]
        lines.append(_row(task, [f"{s.loss:.3f} / {100 * s.exact:3.0f}%" for s in cells]))
    means = [_mean(base_scores)] + [_mean(r.scores) for r in runs]
    lines.append(_row("mean", [f"{lo:.3f} / {100 * ex:3.0f}%" for lo, ex in means]))
    lines += ["", verdict(runs), "", f"total time {seconds:.0f} s"]
    return "\n".join(lines)


def verdict(runs) -> str:
    """The result in one sentence: each method's exact answers and loss, and which did best
    (most prompts answered exactly, then the lower loss)."""
    scored = [(r, *_mean(r.scores)) for r in runs]
    best = max(scored, key=lambda t: (t[2], -t[1]))[0]
    parts = ", ".join(f"{r.name} {100 * ex:.0f}% (loss {lo:.3f})" for r, lo, ex in scored)
    return (f"result: prompts answered exactly after fine-tuning: {parts}. Best here: {best.name}. "
            "One seed of one small task set: see the README's quality benchmark for methods on a real model.")


def _mean(scores) -> tuple[float, float]:
    return (sum(scores[t].loss for t in TASKS) / len(TASKS), sum(scores[t].exact for t in TASKS) / len(TASKS))


def write(out: Path, text: str, cfg, pre, base_scores, runs) -> Path:
    """Write ``report.txt`` and ``report.json`` into ``out``; returns the text file's path."""
    data = {
        "config": asdict(cfg),
        "pretrain": {"first_loss": final_loss(pre.loss[:20]), "final_loss": final_loss(pre.loss)},
        "base_model": {t: asdict(s) for t, s in base_scores.items()},
        "methods": {r.name: {"spec": r.spec.name, "parameters": r.parameters, "gamma": r.gamma,
                             "final_loss": final_loss(r.curve.loss), "final_aux_loss": final_loss(r.curve.aux),
                             "ms_per_step": r.curve.ms_per_step, "adapter": str(r.adapter_dir), "merged": str(r.merged),
                             "scores": {t: asdict(s) for t, s in r.scores.items()}, "loss": r.curve.loss}
                    for r in runs},
    }
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
    atomic_write(out / "report.txt", lambda tmp: Path(tmp).write_text(text + "\n"))
    return out / "report.txt"
