"""Every preset as a data-parallel case (``tests/test_ddp_stats.py``, ``tests/test_fsdp2.py``): the
preset on a float64 one-layer tiny Llama, up-projections drawn non-zero, aux losses weighted up,
with the inputs it needs (task ids, LoRAMoE's sample types, PEFT LoRA folders for pools of frozen
experts), and one process's gradients on the concatenated batch.

The workers live in ``ddp_helpers.py``; this module only builds the cases, so that the ranks and
the reference build the same ones."""

from __future__ import annotations

from pathlib import Path

import torch

from ddp_helpers import SEQ, WORLD, adapter_grads, forward_backward

ADJUSTED = {
    "smore_noisy": "its gate adds noise drawn per token in training, which one process cannot draw for a "
                   "concatenated batch as the ranks draw it for their halves; compared instead: both ranks route "
                   "the same batch with the same seeded noise (seed_noise(7, rank=0)), whose whole-batch loss is "
                   "that of one copy (the LM loss is a token mean, the CV² losses are scale-free in their summed "
                   "statistics), against one process on that batch with that seed. A missing sum of the "
                   "statistics over the ranks would not show here; the smore_cv2 grad case (ddp_helpers) checks "
                   "that sum for a tree's CV² loss with a different batch per rank",
    "xlora": "its classifier's dropout (0.2) draws masks from torch's generator per row, which one process "
             "cannot draw for a concatenated batch as the ranks draw them; compared with that dropout set to 0",
}
"""Presets whose single-process equivalence is not exact by construction, and what is compared
instead. Every other preset runs as shipped (up-projections drawn, aux losses weighted up, with
the inputs it needs)."""

SAME_BATCH = frozenset({"smore_noisy"})
"""Presets whose ranks route the same batch (see ``ADJUSTED``)."""

WITHOUT_DROPOUT = frozenset({"xlora"})
"""Presets compared with every dropout of their spec set to 0 (see ``ADJUSTED``)."""

NOISE_SEED = 7
FOLDER_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expert_folders(folder: str | Path) -> list[Path]:
    """Three PEFT LoRA folders (A and B drawn, ranks 4, 2, 4) on every projection of the one-layer
    tiny Llama, under ``folder/experts`` (made by :func:`make_expert_folders`)."""
    return [Path(folder, "experts", f"e{i}") for i in range(3)]


def make_expert_folders(folder: str | Path) -> None:
    """Write :func:`expert_folders` (PEFT itself saves them; the same tensors every time)."""
    from peft import LoraConfig, get_peft_model

    from models import tiny

    for i, (path, r) in enumerate(zip(expert_folders(folder), (4, 2, 4))):
        torch.manual_seed(40 + i)
        config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=FOLDER_MODULES)
        get_peft_model(tiny("llama", layers=1), config).save_pretrained(str(path))


def takes_folders(spec) -> bool:
    """Whether a pool of ``spec`` composes frozen experts (CAT, MeteoRA, X-LoRA): it takes the folders."""
    return any(getattr(s.adapter, "frozen_experts", False) for s in spec.sites)


def _without_dropout(data):
    """``data`` (a spec's JSON) with every ``dropout`` set to 0 (see ``ADJUSTED``)."""
    if isinstance(data, dict):
        return {k: 0.0 if k == "dropout" else _without_dropout(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_without_dropout(v) for v in data]
    return data


def preset_spec(name: str, folder: str | Path):
    """Preset ``name`` with the folders as experts where it composes frozen ones, up-projections
    drawn and aux losses weighted up (their gradients must show beside the LM loss's)."""
    import moleforge as mf
    from moleforge.cli.experts import with_experts

    spec = mf.presets.load(name)
    if takes_folders(spec):
        spec = with_experts(spec, [str(p) for p in expert_folders(folder)])
    if name in WITHOUT_DROPOUT:
        spec = mf.AdapterSpec.model_validate(_without_dropout(spec.model_dump(mode="json")))
    return spec.with_init(mf.Init(up="normal", std=0.3, seed=1)).model_copy(update={"aux_loss_coef": 20.0})


def preset_model(name: str, folder: str | Path):
    """A float64 one-layer tiny Llama in training mode with the preset compiled in: ``(model,
    handle)``; the noisy gate's noise seeded as rank 0's."""
    import moleforge as mf
    from models import tiny

    model = tiny("llama", layers=1).double().train()
    handle = mf.compile(preset_spec(name, folder), model)
    if name in SAME_BATCH:
        handle.seed_noise(NOISE_SEED, rank=0)
    return model, handle


def _needs_sample_types(handle) -> bool:
    from moleforge.ir import AuxLoss

    return any(isinstance(n, AuxLoss) and n.kind == "localized_balance"
               for g in handle.graphs.values() for n in g.nodes)


def preset_batch(name: str, handle, rank: int) -> dict:
    """Rank ``rank``'s batch (2 sequences of ``SEQ`` tokens), with task ids for an adapter that
    reads them and sample types for LoRAMoE's localized balance (two tasks, two types, so that
    every task-routed preset takes them)."""
    from moleforge.integrations.task_ids import reads_task_ids

    seed = 300 if name in SAME_BATCH else 300 + rank
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids.clone()}
    tasks = torch.tensor([rank % 2, 1])
    if reads_task_ids(handle.graphs):
        batch["task_ids"] = tasks
    if _needs_sample_types(handle):
        batch["types"] = tasks
    return batch


def reference_batch(name: str, handle, world: int = WORLD) -> dict:
    """What one process trains on: every rank's batch as one (one copy where the ranks share it)."""
    if name in SAME_BATCH:
        return preset_batch(name, handle, 0)
    parts = [preset_batch(name, handle, r) for r in range(world)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def rank_step(name: str, folder: str | Path, rank: int, wrap) -> tuple[dict[str, torch.Tensor], float | None]:
    """Rank ``rank``'s forward and backward of the preset under ``wrap`` (DDP, or FSDP2 sharding
    in place): its adapter gradients and the aux loss it reports (``None``: the preset has none)."""
    model, handle = preset_model(name, folder)
    out = forward_backward(wrap(model), handle, preset_batch(name, handle, rank))
    return adapter_grads(handle), _aux(out)


def _aux(out) -> float | None:
    aux = getattr(out, "aux_loss", None)
    return None if aux is None else float(aux.detach())


_REFERENCES: dict[str, tuple[dict[str, torch.Tensor], float | None]] = {}


def preset_reference(name: str, folder: str | Path) -> tuple[dict[str, torch.Tensor], float | None]:
    """One process on the reference batch: the adapter gradients and the aux loss (computed once
    per preset: DDP's test and FSDP2's compare with the same)."""
    if name not in _REFERENCES:
        model, handle = preset_model(name, folder)
        out = forward_backward(model, handle, reference_batch(name, handle))
        _REFERENCES[name] = adapter_grads(handle), _aux(out)
    return _REFERENCES[name]


def assert_like_one_process(name: str, ranks: list[tuple[dict, float | None]], folder: str | Path) -> None:
    """Every rank's ``(gradients, aux loss)`` of preset ``name`` equal one process's on the
    reference batch (float64): the gradients to 1e-10 of the largest, the aux loss (every rank
    reports the whole batch's) to 1e-10 of itself. Every trainable tensor's reference gradient is non-zero,
    so that no comparison passes on zeros."""
    import pytest

    want, want_aux = preset_reference(name, folder)
    zero = [k for k, g in want.items() if not g.abs().max() > 0]
    assert want and not zero, f"{name}: no gradient reaches {zero or 'any tensor'}"
    scale = max(float(g.abs().max()) for g in want.values())
    for r, (got, aux) in enumerate(ranks):
        assert got.keys() == want.keys(), (name, r)
        diff = max(float((got[k] - want[k]).abs().max()) for k in want) / scale
        assert diff < 1e-10, f"{name}, rank {r}: gradients differ from one process's by {diff:.3g} of the largest"
        assert (aux is None) == (want_aux is None), (name, r)
        if want_aux is not None:
            assert aux == pytest.approx(want_aux, rel=1e-10, abs=1e-15), f"{name}, rank {r}: aux loss {aux!r}, " \
                f"one process's {want_aux!r}"
