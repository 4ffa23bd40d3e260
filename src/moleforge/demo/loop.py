"""The demo's training and evaluation loops: plain PyTorch, short enough to read.

Pretraining updates every weight of the small model; fine-tuning updates only the
adapter's (``handle.trainable_parameters()``) and steps the balancing biases after each
optimizer step (``handle.update_balancing()``, a no-op for the trees and LoRA).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import IGNORE, Example, collate
from ..integrations.handle import AdapterHandle
from .tasks import pretrain_batch

__all__ = ["Curve", "TaskScore", "pretrain", "finetune", "evaluate"]


@dataclass
class Curve:
    """Training loss per step without the aux loss, and the adapter's weighted aux loss
    (``out.loss = loss + aux``; aux is 0 when the adapter has none)."""

    loss: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / max(1, len(self.loss))


@dataclass(frozen=True)
class TaskScore:
    """Mean loss per answer token and the fraction of answers whose every token is the
    argmax (teacher-forced, which equals greedy decoding getting the answer exactly right)."""

    loss: float
    exact: float


def _schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _train(model: nn.Module, params: list[nn.Parameter], batches, steps: int, lr: float, desc: str,
           progress: bool, handle: AdapterHandle | None = None) -> Curve:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup=max(1, steps // 20)))
    curve = Curve()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        out = model(**batches(step))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if handle is not None:
            handle.update_balancing()
        aux = handle.aux_loss() if handle is not None else None
        curve.aux.append(0.0 if aux is None else aux.item())
        curve.loss.append(out.loss.item() - curve.aux[-1])
        bar.set_postfix(loss=f"{curve.loss[-1]:.3f}", refresh=False)
    curve.seconds = time.perf_counter() - t0
    model.eval()
    return curve


def pretrain(model: nn.Module, steps: int, *, batch: int = 32, lr: float = 3e-3, seed: int = 0,
             progress: bool = True) -> Curve:
    """Train every weight of ``model`` on :func:`~moleforge.demo.tasks.pretrain_batch` sequences."""
    gen = torch.Generator().manual_seed(seed)

    def batches(step: int) -> dict[str, torch.Tensor]:
        return pretrain_batch(gen, batch)

    for p in model.parameters():
        p.requires_grad_(True)
    return _train(model, list(model.parameters()), batches, steps, lr, "pretrain", progress)


def finetune(handle: AdapterHandle, examples: list[Example], steps: int, *, pad_id: int, batch: int = 32,
             lr: float = 3e-3, seed: int = 0, desc: str = "finetune", progress: bool = True) -> Curve:
    """Train the adapter on batches drawn uniformly from ``examples``."""
    gen = torch.Generator().manual_seed(seed)

    def batches(step: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(0, len(examples), (batch,), generator=gen).tolist()
        return collate([examples[i] for i in pick], pad_id)

    params = list(handle.trainable_parameters())
    return _train(handle.model, params, batches, steps, lr, desc, progress, handle)


@torch.no_grad()
def evaluate(model: nn.Module, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, TaskScore]:
    """:class:`TaskScore` per task, from one collated batch per task."""
    model.eval()
    scores = {}
    for task, b in batches.items():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]  # (B, S-1, V)
        target = b["labels"][:, 1:]  # (B, S-1)
        learned = target != IGNORE  # (B, S-1)
        loss = torch.nn.functional.cross_entropy(logits[learned].float(), target[learned])
        hit = (logits.argmax(-1) == target) | ~learned  # (B, S-1)
        scores[task] = TaskScore(loss=loss.item(), exact=hit.all(dim=1).float().mean().item())
    return scores
