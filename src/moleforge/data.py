"""Training data from JSON Lines: one record per line, in one of three shapes.

    {"text": "the whole sequence is learned"}
    {"prompt": "copy 3 1 4 =", "completion": " 3 1 4"}      # loss on the completion only
    {"input_ids": [1, 7, 3, 9, 2]}                          # already tokenized

Other keys (a task tag, an id) are carried along and ignored.

``read_jsonl`` parses and checks the file, ``encode`` turns a record into token ids and
labels (``-100`` where no loss is taken), ``collate`` pads a batch on the right.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from .errors import MoleforgeError

__all__ = ["DataError", "Example", "read_jsonl", "record_kind", "encode", "encode_all", "collate", "IGNORE",
           "number_tasks"]

IGNORE = -100
"""Label of a position that takes no loss (the HF convention)."""

_SHAPES = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "input_ids": ("input_ids",)}
_CONTENT = {"text", "prompt", "completion", "input_ids"}


class DataError(MoleforgeError, ValueError):
    """A data file is missing, not JSON Lines, or holds a record of an unknown shape."""


class Tokenizer(Protocol):
    """What ``encode`` needs of a HuggingFace tokenizer."""

    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One encoded sequence: ``input_ids (S,)`` and ``labels (S,)`` (``IGNORE`` = no loss)."""

    input_ids: list[int]
    labels: list[int]
    task: int | str | None = None
    """The record's ``task`` field: a task id, or a task name (``encode_all`` numbers the names in
    sorted order), for routers that read it (the model input ``task_ids``)."""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON Lines file (blank lines are skipped).

    Raises:
        DataError: the file is missing or empty, a line is not a JSON object, or a record
            has none of the known shapes (the message names the line).
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a directory; give a JSON Lines file")
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    records = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{p}:{lineno}")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            record_kind(rec, where=f"{p}:{lineno}")
            records.append(rec)
    if not records:
        raise DataError(f"{p} holds no records; write one JSON object per line, e.g. {{\"text\": \"...\"}}")
    return records


def _decode(raw: bytes, where: str) -> str:
    """One line of the file as text; JSON Lines files are UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8; JSON Lines files "
                        "are UTF-8 text: convert the file (e.g. iconv -f latin1 -t utf-8)") from None


def record_kind(rec: Any, where: str = "record") -> str:
    """``"text"``, ``"prompt_completion"`` or ``"input_ids"``, from which content keys the record
    has (other keys, such as a ``"task"`` tag, are ignored); raises :class:`DataError` when none
    or several shapes match."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    content = set(rec) & _CONTENT
    for kind, fields in _SHAPES.items():
        if content == set(fields):
            _check_values(rec, kind, where)
            return kind
    raise DataError(f"{where}: keys {sorted(rec)} match no record shape; use {{\"text\": ...}}, "
                    f"{{\"prompt\": ..., \"completion\": ...}} or {{\"input_ids\": [...]}}")


def _check_values(rec: dict, kind: str, where: str) -> None:
    if kind == "input_ids":
        ids = rec["input_ids"]
        if not (isinstance(ids, list) and ids):
            raise DataError(f"{where}: input_ids must be a non-empty list of non-negative integers")
        for j, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:  # JSON true is no token id 1
                raise DataError(f"{where}: input_ids must be a non-empty list of non-negative integers; "
                                f"input_ids[{j}] is {json.dumps(i)[:40]}")
        return
    for field in _SHAPES[kind]:
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: {field!r} must be a string, got {type(rec[field]).__name__}")
    if kind == "text" and not rec["text"]:
        raise DataError(f"{where}: 'text' is empty")
    if kind == "prompt_completion" and not rec["completion"]:
        raise DataError(f"{where}: 'completion' is empty, so the record has nothing to learn")


def encode(rec: dict, tokenizer: Tokenizer | None, max_length: int) -> Example:
    """Token ids and labels of one record, cut to ``max_length`` tokens.

    ``text``: the tokenizer's ids (with its special tokens) then ``eos``; every position is
    learned. ``prompt_completion``: ``ids(prompt) + ids(completion, no special tokens) + eos``;
    only the completion and ``eos`` are learned. ``input_ids``: used as given, all learned.

    Raises:
        DataError: a text record and no tokenizer.
    """
    ex = _encode(rec, tokenizer, max_length)
    return ex if rec.get("task") is None else Example(ex.input_ids, ex.labels, _task(rec["task"]))


def _task(value) -> int | str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"'task' = {value!r}: a task is a non-negative integer id (0, 1, ...) or a name")
    return value


def number_tasks(examples: list[Example]) -> tuple[list[Example], dict]:
    """Examples whose tasks are ids: names become ``0, 1, ...`` in sorted order. Returns the
    examples and ``{name or id: id}``.

    Raises:
        DataError: ids and names mixed, or some records with a task and some without.
    """
    tasks = [e.task for e in examples]
    given = [t for t in tasks if t is not None]
    if not given:
        return examples, {}
    if len(given) < len(tasks):
        first = tasks.index(None)
        raise DataError(f"record {first + 1} has no 'task' field but {len(given)} other records have one: give "
                        "every record its task, or none")
    if len({type(t) for t in given}) > 1:
        raise DataError("the 'task' fields mix integer ids and names: use one or the other")
    names = sorted(set(given))
    ids = {t: (t if isinstance(t, int) else names.index(t)) for t in names}
    return [Example(e.input_ids, e.labels, ids[e.task]) for e in examples], ids


def _encode(rec: dict, tokenizer: Tokenizer | None, max_length: int) -> Example:
    kind = record_kind(rec)
    if kind == "input_ids":
        ids = list(rec["input_ids"])[:max_length]
        return Example(ids, list(ids))
    if tokenizer is None:
        raise DataError("text records need a tokenizer; give the model directory one "
                        "(tokenizer.save_pretrained(DIR)) or write {\"input_ids\": [...]} records")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if kind == "text":
        ids = list(tokenizer(rec["text"])["input_ids"]) + eos
        return Example(ids[:max_length], ids[:max_length])
    prompt = list(tokenizer(rec["prompt"])["input_ids"])
    completion = list(tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]) + eos
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    return Example(ids, labels)


def encode_all(records: Sequence[dict], tokenizer: Tokenizer | None, max_length: int) -> list[Example]:
    """``encode`` every record; records cut down to no learned token are dropped.

    Raises:
        DataError: no record has a learned token left (``max_length`` too small for the prompts).
    """
    out = [encode(r, tokenizer, max_length) for r in records]
    kept = [e for e in out if any(t != IGNORE for t in e.labels[1:])]
    if not kept:
        raise DataError(f"no record has a token to learn within max_length={max_length}; raise --max-length")
    return kept


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right: ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, S_max)``; and
    ``task_ids (B,)`` when the examples carry task ids."""
    S = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)  # (B, S)
    labels = torch.full((len(batch), S), IGNORE, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(batch), S), dtype=torch.long)  # (B, S)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if batch and all(isinstance(e.task, int) for e in batch):
        out["task_ids"] = torch.tensor([e.task for e in batch], dtype=torch.long)  # (B,)
    return out
