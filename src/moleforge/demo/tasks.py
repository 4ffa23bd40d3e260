"""The demo's synthetic world: counting tasks over the digits 0-9, each named by its step.

A prompt is a tag and a start digit; the completion counts on from the start by the tag's
step, modulo 10, for four digits:

    +2 7   ->  9 1 3 5
    -2 7   ->  5 3 1 9
    +4 7   ->  1 5 9 3
    +5 7   ->  2 7 2 7

The base model is pretrained on four other steps (``+1 -1 +3 -3``); fine-tuning teaches it
the four new tags, which it has never seen. Each task has ten prompts, one per start digit.
"""

from __future__ import annotations

import torch

__all__ = ["PRETRAIN_TASKS", "TASKS", "VOCAB", "ANSWER_DIGITS", "make_tokenizer", "solve", "task_record",
           "task_records", "pretrain_batch"]

PRETRAIN_TASKS = {"+1": 1, "-1": -1, "+3": 3, "-3": -3}
"""Tags the base model learns in pretraining, and their steps."""
TASKS = {"+2": 2, "-2": -2, "+4": 4, "+5": 5}
"""Tags the adapters learn in fine-tuning, and their steps."""
ANSWER_DIGITS = 4
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB = SPECIALS + tuple(PRETRAIN_TASKS) + tuple(TASKS) + tuple(str(d) for d in range(10))
_ID = {t: i for i, t in enumerate(VOCAB)}


def make_tokenizer():
    """A word-level HF tokenizer over :data:`VOCAB`: whitespace split, ``<bos>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", _ID["<bos>"])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def solve(step: int, start: int) -> list[int]:
    """``start + k·step mod 10`` for ``k = 1 .. ANSWER_DIGITS``."""
    return [(start + k * step) % 10 for k in range(1, ANSWER_DIGITS + 1)]


def task_record(tag: str, start: int) -> dict:
    """``{"prompt": "+2 7", "completion": " 9 1 3 5", "task": "+2"}``."""
    step = TASKS.get(tag, PRETRAIN_TASKS.get(tag))
    if step is None:
        raise ValueError(f"unknown task {tag!r}; tasks: {', '.join(TASKS)}, pretraining: {', '.join(PRETRAIN_TASKS)}")
    return {"prompt": f"{tag} {start}", "completion": " " + " ".join(map(str, solve(step, start))), "task": tag}


def task_records() -> list[dict]:
    """Every fine-tuning prompt: each task of :data:`TASKS` from each start digit."""
    return [task_record(tag, start) for tag in TASKS for start in range(10)]


def pretrain_batch(gen: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` pretraining sequences ``<bos> tag start a1 .. a4 <eos>`` over
    :data:`PRETRAIN_TASKS`, every token learned: ``input_ids`` and ``labels``, ``(batch, 8)``."""
    tags = list(PRETRAIN_TASKS)
    pick = torch.randint(0, len(tags), (batch,), generator=gen).tolist()
    starts = torch.randint(0, 10, (batch,), generator=gen).tolist()
    rows = []
    for p, s in zip(pick, starts):
        digits = [s] + solve(PRETRAIN_TASKS[tags[p]], s)
        rows.append([_ID["<bos>"], _ID[tags[p]]] + [_ID[str(d)] for d in digits] + [_ID["<eos>"]])
    ids = torch.tensor(rows)  # (B, 8)
    return {"input_ids": ids, "labels": ids}
