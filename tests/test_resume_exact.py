"""A ``moleforge train`` run killed with SIGKILL in the middle of writing a checkpoint, then
resumed with ``--resume``, goes on from the last complete checkpoint (the half-written one never
appears as ``checkpoint-N``) and ends bit-identical to a run that was never interrupted: adapter weights and
balancing biases, optimizer and scheduler state, torch's RNG states, the adapter's own noise
generators (router noise and dropout masks), and every logged loss, on one process and on two
``torchrun`` processes (gloo). One process runs the command in this process, except the run
that is killed. The spec draws from every random stream a run has: S'MoRE's noisy
gate, PEFT dropout, a SMoRA balancing bias, and the Trainer's shuffled data order."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from models import VOCAB, tiny
from moleforge.cli import main

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SPEC = TESTS / "data" / "resume_spec.json"
TIMEOUT = 240
STEPS, KILL_AT = 4, 3
"""The run is killed while it writes checkpoint 3 and resumes from checkpoint 2."""
VOLATILE = ("runtime", "per_second", "total_flos")
"""Log entries that measure time, not training."""


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A one-layer tiny Llama saved with ``save_pretrained`` and 24 records of 3 to 9 tokens
    (batches are padded, so the order of the records matters)."""
    folder = tmp_path_factory.mktemp("resume")
    tiny("llama", layers=1).save_pretrained(folder / "model")
    rng = random.Random(0)
    lines = [json.dumps({"input_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))]}) for _ in range(24)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "model", folder / "train.jsonl"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _args(model: Path, data: Path, out: Path, resume: bool) -> list[str]:
    return ["train", str(SPEC), "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "2", "--save-steps", "1", "--seed", "11", "--lr", "0.01", *(["--resume"] if resume else [])]


def _run(world: int, model: Path, data: Path, out: Path, *, kill_at: int | None = None, resume: bool = False):
    """``moleforge train`` on ``world`` processes; with ``kill_at``, through the wrapper that
    kills every process after that checkpoint. Returns ``(exit code, output)``."""
    if world == 1 and kill_at is None:
        return _in_process(_args(model, data, out, resume))
    if world == 1:
        launch = [sys.executable]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    target = [str(TESTS / "kill_after_checkpoint.py"), str(kill_at)] if kill_at else ["-m", "moleforge"]
    proc = subprocess.run([*launch, *target, *_args(model, data, out, resume)], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr[-3000:]


def _in_process(args: list[str]) -> tuple[int, str]:
    """One process needs no launcher: run the command here, on one thread like the killed run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    return result.exit_code, result.output


def same(a, b, where: str) -> None:
    """``a`` and ``b`` (nested dicts, lists, tensors, numbers) are identical, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _logs(folder: Path) -> list[dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in h.items() if not any(s in k for s in VOLATILE)} for h in history]


def _state(out: Path) -> dict:
    """Everything a run leaves that resuming must reproduce."""
    last = out / f"checkpoint-{STEPS}"
    files = sorted(p.name for p in last.iterdir())
    state = {"files": files, "logs": _logs(last), "adapter": load_file(out / "adapter" / "moleforge_model.safetensors")}
    for name in files:
        if name.endswith(".pt") or name.endswith(".pth"):
            state[name] = torch.load(last / name, weights_only=False)
        elif name.endswith(".safetensors"):
            state[name] = load_file(last / name)
    return state


@pytest.mark.parametrize("world", [1, 2])
def test_a_killed_run_resumes_bit_exactly(model_and_data, tmp_path, world):
    model, data = model_and_data
    code, output = _run(world, model, data, tmp_path / "whole")
    assert code == 0, output[-5000:]
    code, output = _run(world, model, data, tmp_path / "killed", kill_at=KILL_AT)
    assert code != 0 and not (tmp_path / "killed" / "adapter").exists(), "the run was killed"
    left = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert left == [".staging", f"checkpoint-{KILL_AT - 2}", f"checkpoint-{KILL_AT - 1}"], left
    partial = tmp_path / "killed" / ".staging" / f"checkpoint-{KILL_AT}"
    assert (partial / "optimizer.pt").is_file() and not list(partial.glob("rng_state*")), "killed mid-save"
    code, output = _run(world, model, data, tmp_path / "killed", resume=True)
    assert code == 0, output[-5000:]
    assert f"resuming from {tmp_path / 'killed' / f'checkpoint-{KILL_AT - 1}'}" in output
    assert not (tmp_path / "killed" / ".staging").exists(), "the next save cleared the half-written one"
    expected, got = _state(tmp_path / "whole"), _state(tmp_path / "killed")
    noise = [f"moleforge_noise_{r}.safetensors" for r in range(world)]
    assert set(noise) <= set(expected["files"]), "each rank saved its noise generators"
    assert any(k.endswith(".balance") and v.abs().max() > 0 for k, v in expected["adapter"].items()), \
        "the balancing bias moved, so its restoring is checked"
    assert [h["step"] for h in expected["logs"] if "loss" in h] == list(range(1, STEPS + 1))
    same(expected, got, "run")
