"""Pools whose experts are trained PEFT LoRA folders (``experts_from``): read the folders, check
that they fit the modules the site adapts, record each folder's rank and alpha in the spec and
give the experts' stacked tensors, which ``compile`` loads into the sites.

Per module, expert ``i`` contributes ``s_i (x A_iᵀ) B_iᵀ`` with its folder's ``A_i (r_i, d_in)``,
``B_i (d_out, r_i)`` and scale ``s_i``. The pool stores ``A (E, R, d_in)``, ``B (E, d_out, R)``
with ``R = max r_i`` (zero-padded ranks: the padding adds nothing). When every expert at every
module of the site has the same rank, alpha and rsLoRA flag, the pool keeps them (its scale is
``s``); otherwise the pool's scale is 1 and each ``s_i`` is folded into ``B_i``. A pool whose
folders differ in ``trainable`` gets each run of same-flag experts as its own tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..integrations.sites import ResolvedSite, resolve_sites
from ..interop.peft_format import ModuleLoRA, PeftLoRA, read_peft_lora
from ..specs import AdapterSpec, ExpertPool, PreserveLoss
from ..specs.sources import ExpertRun, expert_runs

__all__ = ["has_sources", "resolve_sources"]


def has_sources(spec: AdapterSpec) -> bool:
    """Whether a site's pool names PEFT LoRA folders."""
    return any(isinstance(s.adapter, ExpertPool) and s.adapter.experts_from for s in spec.sites)


def resolve_sources(spec: AdapterSpec, model: nn.Module) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """``(spec with each folder's rank and alpha recorded, {"<module>.A"/"<module>.B": tensor})``.

    Raises:
        CheckpointError: a folder is missing or unreadable, lacks a module the site adapts, or its
            factors do not fit the module (another base model), or its rank or alpha differs from
            the one the spec gives; the message names the folder, the module and the shapes.
    """
    if not has_sources(spec):
        return spec, {}
    by_site: dict[int, list[ResolvedSite]] = {}
    for r in resolve_sites(spec, model):
        by_site.setdefault(r.site_index, []).append(r)
    sites, tensors = list(spec.sites), {}
    for i, site in enumerate(spec.sites):
        pool = site.adapter
        if not (isinstance(pool, ExpertPool) and pool.experts_from):
            continue
        folders = [_read(src.path, i, j) for j, src in enumerate(pool.experts_from)]
        per_module = _match_modules(i, pool, folders, by_site.get(i, []))
        new_pool, stacked = _stack_site(pool, per_module)
        sites[i] = site.model_copy(update={"adapter": new_pool})
        tensors.update(stacked)
    return spec.model_copy(update={"sites": sites}), tensors


def _read(path: str, i: int, j: int) -> PeftLoRA:
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"sites[{i}].adapter.experts_from[{j}].path = {path!r}: no such folder; give a PEFT "
                              "LoRA folder (adapter_config.json + adapter_model.safetensors)")
    return read_peft_lora(d)


def _find(folder: PeftLoRA, module: str) -> ModuleLoRA | None:
    """The folder's LoRA of ``module`` (PEFT names may carry or lack a leading prefix)."""
    if module in folder.modules:
        return folder.modules[module]
    hits = [m for n, m in folder.modules.items() if n.endswith("." + module) or module.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _match_modules(i: int, pool: ExpertPool, folders: list[PeftLoRA],
                   resolved: list[ResolvedSite]) -> dict[str, list[ModuleLoRA]]:
    """Each adapted module's LoRA in every folder; every misfit is collected, then raised once."""
    problems: list[str] = []
    out: dict[str, list[ModuleLoRA]] = {}
    for r in resolved:
        loras = []
        for j, (src, folder) in enumerate(zip(pool.experts_from, folders)):
            lora = _find(folder, r.name)
            if lora is None:
                some = ", ".join(sorted(folder.modules)[:3])
                problems.append(f"folder {src.path}: no LoRA for module {r.name!r} (sites[{i}] adapts it); the "
                                f"folder adapts {len(folder.modules)} modules ({some}, ...): target only modules "
                                "every folder adapts, or use LoRAs trained on these modules")
                continue
            problems += _misfits(i, j, src, folder, r, lora)
            loras.append(lora)
        out[r.name] = loras
    if problems:
        raise CheckpointError(f"the PEFT LoRA folders of sites[{i}].adapter.experts_from do not fit this model:\n  - "
                              + "\n  - ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return out


def _misfits(i: int, j: int, src, folder: PeftLoRA, r: ResolvedSite, lora: ModuleLoRA) -> list[str]:
    d_in, d_out = r.shape.d_in, r.shape.d_out
    got = (int(lora.a.shape[1]), int(lora.b.shape[0]))
    where = f"folder {src.path}: module {r.name!r}"
    if got != (d_in, d_out):
        base = folder.config.get("base_model_name_or_path")
        return [f"{where}: lora_A {tuple(lora.a.shape)} and lora_B {tuple(lora.b.shape)} are for a linear "
                f"(d_in, d_out) = {got}, the model's is {(d_in, d_out)}: the LoRA was trained on another base "
                f"model ({base or 'base_model_name_or_path not recorded'})"]
    out = []
    if src.rank is not None and lora.rank != src.rank:
        out.append(f"{where}: rank {lora.rank} (lora_A {tuple(lora.a.shape)}), but sites[{i}].adapter."
                   f"experts_from[{j}].rank = {src.rank}: set it to {lora.rank} or leave it out")
    if src.alpha is not None and lora.alpha != src.alpha:
        out.append(f"{where}: lora_alpha {lora.alpha:g}, but sites[{i}].adapter.experts_from[{j}].alpha = "
                   f"{src.alpha:g}: set it to {lora.alpha:g} or leave it out")
    return out


def _stack_site(pool: ExpertPool, per_module: dict[str, list[ModuleLoRA]]):
    """The pool with its rank, alpha and scaling, the folders' ranks and alphas recorded, and the
    stacked tensors of every module."""
    every = [lo for loras in per_module.values() for lo in loras]
    R = max(lo.rank for lo in every)
    same = len({(lo.rank, lo.alpha, lo.rslora) for lo in every}) == 1
    alpha, scaling = ((every[0].alpha, "rslora" if every[0].rslora else "alpha_over_rank") if same
                      else (float(R), "alpha_over_rank"))
    recorded = []
    for j, src in enumerate(pool.experts_from):
        mine = {(loras[j].rank, loras[j].alpha) for loras in per_module.values()}
        rank, a = next(iter(mine)) if len(mine) == 1 else (None, None)
        recorded.append(src.model_copy(update={"rank": rank, "alpha": a}))
    data = {**pool.model_dump(), "rank": R, "alpha": alpha, "scaling": scaling,
            "experts_from": [s.model_dump() for s in recorded]}
    tensors: dict[str, torch.Tensor] = {}
    runs = expert_runs(pool)
    preserve = any(isinstance(aux, PreserveLoss) for aux in pool.aux_losses)
    for module, loras in per_module.items():
        A, B = _stack(loras, R, fold=not same)
        tensors.update(_by_run(module, A, B, runs, preserve))
    return ExpertPool.model_validate(data), tensors


def _by_run(module: str, A: torch.Tensor, B: torch.Tensor, runs: list[ExpertRun],
            preserve: bool) -> dict[str, torch.Tensor]:
    """``{"<module>.A": A, "<module>.B": B}``, or for a pool of trainable and frozen experts each
    run's slice under its own name (``<module>.A_0_2``: ``compiler/build_mixed.py``); with a
    ``preserve`` loss, each trainable tensor's starting value too (``<module>.A_0_2_start``)."""
    parts = ([("A", "B", A, B, True)] if not runs else
             [(run.name("A"), run.name("B"), A[run.start:run.stop], B[run.start:run.stop], run.trainable)
              for run in runs])
    out = {}
    for a_name, b_name, a, b, learn in parts:
        out[f"{module}.{a_name}"], out[f"{module}.{b_name}"] = a, b
        if preserve and learn:
            out[f"{module}.{a_name}_start"], out[f"{module}.{b_name}_start"] = a, b
    return out


def _stack(loras: list[ModuleLoRA], R: int, fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (E, R, d_in)``, ``B (E, d_out, R)`` in float64, ranks zero-padded to ``R``."""
    d_in, d_out = loras[0].a.shape[1], loras[0].b.shape[0]
    A = torch.zeros(len(loras), R, d_in, dtype=torch.float64)
    B = torch.zeros(len(loras), d_out, R, dtype=torch.float64)
    for i, lo in enumerate(loras):
        A[i, :lo.rank] = lo.a.to(torch.float64)
        B[i, :, :lo.rank] = lo.b.to(torch.float64) * (lo.scale if fold else 1.0)
    return A, B
