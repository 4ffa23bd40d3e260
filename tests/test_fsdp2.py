"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on two CPU processes (gloo): the adapter's
parameters are sharded ``DTensor``s; the aux-loss gradients equal one process's on the whole
batch, the balancing biases stay equal on every rank (FSDP2 never syncs buffers), and
``mf.save``, called on every rank, gathers the shards and writes once, on rank 0."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import moleforge as mf
from ddp_helpers import FSDP_CASES, WORLD, fsdp_worker, reference_biases, reference_grads
from preset_cases import assert_like_one_process, make_expert_folders


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    make_expert_folders(folder)
    mp.spawn(fsdp_worker, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_gradients_with_aux_losses_equal_one_process_on_the_whole_batch(run, case):
    _, ranks = run
    want, _ = reference_grads(case)
    scale = max(float(g.abs().max()) for g in want.values())
    for r in range(WORLD):
        got = ranks[r]["grads"][case]
        assert got.keys() == want.keys()
        assert max(float((got[k] - want[k]).abs().max()) for k in want) / scale < 1e-10, (case, r)


def test_fsdp2_balancing_biases_are_those_of_the_whole_batch_on_every_rank(run):
    _, ranks = run
    want = reference_biases()
    for r in range(WORLD):
        assert ranks[r]["biases"].keys() == want.keys()
        for k in want:
            assert torch.equal(ranks[r]["biases"][k], want[k]), (r, k)


def test_fsdp2_save_gathers_and_writes_once_and_loads_into_a_sharded_adapter(run):
    folder, ranks = run
    assert (folder / "adapter_rank0" / "moleforge_model.safetensors").is_file()
    assert not (folder / "adapter_rank1").exists(), "only rank 0 writes"
    from moleforge.interop.own_format import read_adapter

    _, tensors = read_adapter(folder / "adapter_rank0")
    saved = ranks[0]["saved"]
    assert tensors.keys() == saved.keys()
    for k in saved:
        assert torch.equal(tensors[k], saved[k]), f"{k}: the whole tensor, not rank 0's shard"
    for r in range(WORLD):
        assert ranks[r]["sharded"], "the fresh adapter was sharded when it loaded"
        for k in saved:
            assert torch.equal(ranks[r]["loaded"][k], saved[k]), (r, k)


@pytest.mark.parametrize("preset", mf.presets.names())
def test_fsdp2_gradients_of_every_preset_equal_one_process_on_the_whole_batch(run, preset):
    """Every preset under ``fully_shard`` per decoder layer and on the model: each rank's gathered
    gradients after one step and its aux loss are one process's on the concatenated batch
    (``preset_cases.ADJUSTED``: the presets compared otherwise, and why)."""
    folder, ranks = run
    assert set(ranks[0]["presets"]) == set(mf.presets.names())
    assert_like_one_process(preset, [r["presets"][preset] for r in ranks], folder)
