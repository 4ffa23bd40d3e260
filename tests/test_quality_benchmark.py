"""``benchmarks/quality.py --quick`` runs end to end and writes what it promises (on the tiny
random model: the suite never needs the pretrained one)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_quick_run_writes_its_json_and_plot(tmp_path):
    quality = _load("quality")
    out = tmp_path / "quality.json"
    quality.main(["--quick", "--model", "tiny", "--steps", "3", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"lora", "molora", "smore"}
    budget = data["budget"]
    for name, r in data["methods"].items():
        assert abs(r["parameters"] - budget) / budget < 0.05, name
        assert len(r["runs"]) == 1 and set(r["test_exact"]) == set(quality.TASKS)
        assert 0.0 <= r["test_exact_overall"]["mean"] <= 1.0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_splits_share_no_prompt_and_answers_are_right():
    tasks = _load("quality_tasks")
    splits = tasks.make_splits(50, 10, 10, seed=3)
    prompts = [{e.prompt for e in part} for part in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert splits == tasks.make_splits(50, 10, 10, seed=3)
    for e in splits["test"]:
        assert e.answer == _solve(e.task, e.prompt.split(": ", 1)[1].split(), tasks.CATEGORIES), e


def _solve(task: str, words: list[str], categories: dict) -> str:
    if task == "reverse":
        return " ".join(reversed(words))
    if task == "sort":
        return " ".join(map(str, sorted(map(int, words))))
    if task == "add":
        return str(int(words[0]) + int(words[2]))
    if task == "count":
        return str(len(words))
    if task == "shift":
        return " ".join(chr(ord(c) + 1) for c in words)
    return next(c for c, ws in categories.items() if words[0] in ws)
