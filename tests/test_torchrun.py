"""``moleforge train`` under ``torchrun``: two processes on one node, and two single-process
"nodes" on this machine (two torchrun invocations rendezvousing at 127.0.0.1), on CPU with gloo.
The run trains, rank 0 alone reports and writes the checkpoints and the adapter, and the
adapter loads."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moleforge as mf
from models import VOCAB, tiny

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 180


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A one-layer tiny Llama saved with ``save_pretrained`` and 16 token-id records."""
    folder = tmp_path_factory.mktemp("torchrun")
    tiny("llama", layers=1).save_pretrained(folder / "model")
    rng = random.Random(0)
    lines = [json.dumps({"input_ids": [rng.randrange(VOCAB) for _ in range(8)]}) for _ in range(16)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "model", folder / "train.jsonl"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _torchrun(launch: list[str], spec: str, model: Path, data: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "moleforge", "train", spec,
           "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
           "--save-steps", "1", "--seed", "3"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def _check_run(output: str, out: Path, model: Path, world: int, trained: tuple[str, ...]) -> None:
    """One report and one adapter, checkpoints with one RNG state per rank; the adapter loads, and
    the tensors named ``trained`` (zero when compiled) moved."""
    assert output.count("adapter saved to") == 1, output[-3000:]
    assert output.count("trainable parameters") == 1, "one report, from rank 0"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-1", "checkpoint-2", "train_summary.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["moleforge_config.json",
                                                                    "moleforge_model.safetensors"]
    ckpt = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "moleforge_model.safetensors" in ckpt and "optimizer.pt" in ckpt
    assert [n for n in ckpt if n.startswith("rng_state")] == [f"rng_state_{r}.pth" for r in range(world)], \
        "the Trainer keeps one RNG state per rank, for resuming"
    assert not [p for p in out.rglob(".*.tmp")], "no temporary files left from concurrent writers"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model)
    handle = mf.load(fresh, out / "adapter")
    for suffix in trained:
        moved = [v for k, v in handle.state_dict().items() if k.endswith(suffix)]
        assert moved and all(v.abs().max() > 0 for v in moved), suffix
    with torch.no_grad():
        ids = torch.arange(8).unsqueeze(0)
        assert torch.isfinite(fresh(input_ids=ids).logits).all()


def test_torchrun_two_processes_trains_smore_and_writes_the_adapter_once(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "run"
    output = _finish(_torchrun(["--standalone", "--nproc_per_node", "2"], "smore", model, data, out))
    _check_run(output, out, model, world=2, trained=(".B0", ".B1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_smora_together(model_and_data, tmp_path):
    """``--nnodes 2``, one process per node, rendezvous at 127.0.0.1 on a free port (SMoRA: the
    balancing update runs on both nodes at every step)."""
    model, data = model_and_data
    out = tmp_path / "run"
    port = _free_port()
    nodes = [_torchrun(["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(port)], "smora", model, data, out)
             for rank in range(2)]
    outputs = [_finish(p) for p in nodes]
    assert "adapter saved to" not in outputs[1], "node 1 writes nothing"
    _check_run("".join(outputs), out, model, world=2, trained=(".B", ".balance"))
