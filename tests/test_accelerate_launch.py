"""``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`` on this CPU: two processes
joined with gloo, the model sharded with FSDP2 (``tests/accelerate_worker.py``: Accelerate shards on
GPUs; on a CPU it selects FSDP only for accelerator devices, so the script shards as Accelerate
would), S'MoRE with its Switch loss: the adapter gradients equal one process's on the concatenated
batch, and ``mf.save``, called on both processes, writes one adapter that loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moleforge as mf
from ddp_helpers import WORLD, case_model, reference_grads

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240
CASE = "smore"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accelerate")
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(TESTS / "accelerate_worker.py"), CASE, str(folder)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_accelerate_launch_fsdp2_gradients_equal_one_process_on_the_whole_batch(run):
    _, ranks = run
    want, want_aux = reference_grads(CASE)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    for r, got in enumerate(ranks):
        assert got["world"] == WORLD and got["sharded"], "two processes, the adapter sharded (DTensors)"
        assert got["grads"].keys() == want.keys()
        assert max(float((got["grads"][k] - want[k]).abs().max()) for k in want) / scale < 1e-10, r
        assert abs(got["aux"] - want_aux) < 1e-10 * max(1.0, abs(want_aux)), "the aux loss of the whole batch"


def test_accelerate_launch_fsdp2_saves_once_and_the_adapter_loads(run):
    folder, _ = run
    assert not (folder / "adapter_rank1").exists(), "only the main process writes"
    model, _ = case_model(CASE)
    handle = mf.load(type(model)(model.config).double(), folder / "adapter_rank0")
    assert any(v.abs().max() > 0 for k, v in handle.state_dict().items() if ".B" in k)
