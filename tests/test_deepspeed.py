"""DeepSpeed ZeRO stage 2 and stage 3 on two CPU processes (``DS_ACCELERATOR=cpu``, gloo), with
``deepspeed.initialize`` on a model whose S'MoRE adapter was compiled first
(``tests/deepspeed_worker.py``): after one SGD step the adapter equals one process's step on the
concatenated batch (float32; DeepSpeed reduces the gradients in float32), the aux loss is the whole
batch's on both ranks, the mean of the ranks' losses is the batch's loss, and ``mf.save`` (inside
``GatheredParameters`` under ZeRO-3) writes one whole adapter, on rank 0.

The HF Trainer's own DeepSpeed integration does not start on a CPU with Accelerate 1.16 (README,
"Training on several processes"); on GPUs it takes ``examples/deepspeed_zero{2,3}.json``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_helpers import WORLD, case_model, concat_batch, forward_backward
from deepspeed_worker import LR
from moleforge.interop.own_format import read_adapter
from tolerances import assert_close

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepspeed")
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, DS_ACCELERATOR="cpu")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(TESTS / "deepspeed_worker.py"), str(folder)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """One process, the concatenated batch, one SGD step: the adapter after it, loss and aux."""
    model, handle = case_model("smore")
    model = model.float()
    before = {k: p.detach().clone() for k, p in handle.named_parameters()}
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=LR)
    out = forward_backward(model, handle, concat_batch("smore"))
    opt.step()
    after = {k: p.detach().clone() for k, p in handle.named_parameters()}
    return before, after, float(out.loss), float(out.aux_loss)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_step_equals_one_process_on_the_whole_batch(run, reference, stage):
    _, ranks = run
    before, want, loss, aux = reference
    assert all(not torch.equal(before[k], want[k]) for k in want), "every adapter tensor moves"
    for r in ranks:
        got = r[stage]
        assert got["after"].keys() == want.keys()
        for k in want:
            assert_close(got["after"][k], want[k], "float32_model", msg=f"stage {stage}: {k}")
        assert abs(got["aux"] - aux) <= 1e-5 * abs(aux), "the aux loss of every rank's tokens"
    assert abs(sum(r[stage]["loss"] for r in ranks) / WORLD - loss) <= 1e-5 * loss


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_saves_the_whole_adapter_once(run, stage):
    folder, ranks = run
    assert not (folder / f"adapter_stage{stage}_rank1").exists(), "only rank 0 writes"
    _, tensors = read_adapter(folder / f"adapter_stage{stage}_rank0")
    after = ranks[0][stage]["after"]
    for k, v in after.items():
        assert torch.equal(tensors[k], v), f"{k}: the whole tensor after the step"
