"""Aux losses and balancing under ``DistributedDataParallel``, two CPU processes (gloo): the
routing statistics are summed over the ranks before the losses are formed, so that the
gradients DDP averages are those of one process on the concatenated batch, and the balancing
counts are summed before the bias step, so that every rank applies the same one."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import moleforge as mf
from ddp_helpers import GRAD_CASES, WORLD, ddp_stats_worker, noisy_logits, reference_biases, reference_grads
from preset_cases import ADJUSTED, SAME_BATCH, WITHOUT_DROPOUT, assert_like_one_process, make_expert_folders


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: ``{"grads": {(case, reduced): ...}, "aux": ..., "biases": ...,
    "presets": {preset: (grads, aux)}}``."""
    folder = tmp_path_factory.mktemp("ddp_stats")
    make_expert_folders(folder)
    mp.spawn(ddp_stats_worker, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") | {"folder": folder} for r in range(WORLD)]


def _max_rel_diff(got: dict, want: dict) -> float:
    scale = max(float(g.abs().max()) for g in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


@pytest.mark.parametrize("case", GRAD_CASES)
def test_ddp_gradients_with_aux_losses_equal_one_process_on_the_whole_batch(ranks, case):
    want, want_aux = reference_grads(case)
    assert all(g.abs().max() > 0 for k, g in want.items() if "router" in k), "the routers learn from the aux loss"
    for r in range(WORLD):
        got = ranks[r]["grads"][case, True]
        assert got.keys() == want.keys()
        assert _max_rel_diff(got, want) < 1e-10, (case, r)
        assert ranks[r]["aux"][case, True] == pytest.approx(want_aux, rel=1e-12), "each rank reports the whole batch's"
    # what the test guards against: each rank's aux loss of its own tokens alone
    assert _max_rel_diff(ranks[0]["grads"][case, False], want) > 1e-4, case


def test_balancing_biases_are_those_of_the_whole_batch_on_every_rank(ranks):
    """Two micro-batches per rank (DDP broadcasts rank 0's buffers before each forward), then one
    update: every rank's biases equal one process's after routing all four micro-batches."""
    want = reference_biases()
    assert want and any(b.abs().max() > 0 for b in want.values())
    for r in range(WORLD):
        got = ranks[r]["biases"]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)


def test_each_rank_draws_its_own_reproducible_noise(ranks):
    """``seed_noise(7)`` on every rank: rank 0 draws what one process seeded with 7 draws, rank 1
    something else (its seed derived from 7 and its rank), the same again when seeded again."""
    alone = noisy_logits()
    assert torch.equal(alone[0], alone[1])
    for r in range(WORLD):
        first, again = ranks[r]["noise"]
        assert torch.equal(first, again), "reproducible"
    assert torch.equal(ranks[0]["noise"][0], alone[0])
    assert not torch.equal(ranks[1]["noise"][0], alone[0])
    assert torch.equal(ranks[1]["noise"][0], noisy_logits(rank=1)[0]), "rank 1's seed follows from the rank"


def test_save_writes_on_rank_zero_only(ranks):
    folder = ranks[0]["folder"]
    assert (folder / "adapter_rank0" / "moleforge_config.json").is_file()
    assert not (folder / "adapter_rank1").exists()


@pytest.mark.parametrize("preset", mf.presets.names())
def test_ddp_gradients_of_every_preset_equal_one_process_on_the_whole_batch(ranks, preset):
    """Every preset (``moleforge presets``) as shipped, with the inputs it needs, under DDP with
    ``find_unused_parameters=True``: each rank's gradients after one step and its aux loss are one
    process's on the concatenated batch (``preset_cases.ADJUSTED``: the presets compared otherwise,
    and why)."""
    assert_like_one_process(preset, [r["presets"][preset] for r in ranks], ranks[0]["folder"])


def test_every_preset_ran_under_ddp_and_every_adjustment_is_explained(ranks):
    assert all(set(r["presets"]) == set(mf.presets.names()) for r in ranks)
    assert set(ADJUSTED) == SAME_BATCH | WITHOUT_DROPOUT, "each preset compared otherwise says why, and only those"
    assert set(ADJUSTED) <= set(mf.presets.names()), "an adjustment for a preset that is gone"
