"""The ecosystem's formats in and out: PEFT LoRA adapters as moleforge sites (``from_peft``),
LoRA-reducible adapters as PEFT LoRA (``export_peft``), and merged HuggingFace models
(``export_merged``)."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..compiler.compile import compile
from ..errors import CheckpointError, NotMergeableError, SpecError
from ..integrations.handle import AdapterHandle
from ..integrations.inject import linear_dims
from ..integrations.quantized import dequantized, quantized_modules
from ..integrations.xlora import XLoRAHandle
from ..ir import Graph, Magnitude
from ..passes import Pass
from ..specs import AdapterSpec, ExpertPool, Init, LoRA, Site, StaticRouter, Target
from . import CONFIG_NAME, WEIGHTS_NAME, write_adapter
from .lowrank import LowRank, NotReducibleError, reduce_site
from .merged import dedupe_shared, fold_delta, write_hf_model
from .peft_format import PeftLoRA, _most_common, lora_config, read_peft_lora, write_peft_lora
from .xlora_peft import export_xlora_peft, is_xlora_folder, read_xlora_folder, xlora_not_mergeable

__all__ = ["from_peft", "export_peft", "export_merged"]

PathLike = str | os.PathLike


# ---- PEFT in ------------------------------------------------------------------------------

def from_peft(model: nn.Module, path_or_paths: PathLike | Sequence[PathLike], *, router=None,
              aux_losses: Sequence = (), frozen: bool = True, seed: int | None = None, name: str | None = None,
              passes: Sequence[Pass] | None = None) -> AdapterHandle:
    """Import PEFT LoRA adapters into ``model`` (in place, like ``mf.compile``).

    One adapter and no ``router``: every adapted module becomes a moleforge ``lora`` site with
    PEFT's rank and scaling (``rank_pattern``, ``alpha_pattern``, rsLoRA and
    ``layers_to_transform`` are honoured: the modules and ranks come from the saved tensors), so
    the logits equal PEFT's; ``lora_dropout`` becomes the sites' ``dropout`` (of a pool: the
    adapters' value when they agree, else none). Several adapters (or a ``router``): each module gets a pool whose
    experts are the adapters, ``Δy = Σ_i g_i(x) s_i (x A_iᵀ) B_iᵀ`` (X-LoRA, MeteoRA, LoRA-Mixer,
    CAT). Ranks are zero-padded to the largest; when the adapters' scales differ they are folded
    into the B's; an adapter that does not touch a module is a zero expert there.

    Args:
        model: the base model the adapters were trained on (same module names, or names that
            differ by a leading prefix).
        path_or_paths: a PEFT adapter directory, or a list of them (the experts, in order).
        router: the pool's router spec (``mf.TopKRouter(k=2)``, ``mf.DenseRouter()``,
            ``mf.StaticRouter()`` ...); default for several adapters: ``StaticRouter()`` (learned
            per-module weights starting at 1, i.e. the sum of the adapters: CAT).
        aux_losses: aux losses of the pool's router.
        frozen: keep the imported experts fixed (only the router trains); a single imported
            LoRA stays trainable.
        seed: seed of the router's initialisation.
        name: the spec's name (default: from the directory).
        passes: optimisation passes, as for ``mf.compile``.
    Returns:
        The handle; ``mf.save`` / ``mf.export_*`` work on it as on any compiled adapter.
    Raises:
        CheckpointError: unreadable files, a PEFT method or LoRA variant moleforge does not
            compute, or modules the model lacks or whose shapes differ.
        SpecError: ``router`` / ``aux_losses`` do not form a valid pool.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if len(paths) == 1 and router is None and is_xlora_folder(paths[0]):  # a PEFT X-LoRA folder
        xrouter, experts, trainable, classifier = read_xlora_folder(paths[0])
        spec, tensors = _pool_spec(experts, _resolve_modules(model, experts), name or f"xlora_{Path(paths[0]).name}",
                                   xrouter, [], not trainable, seed)
        handle = compile(spec, model, passes=passes)
        handle.load_state_dict({**tensors, **classifier})
        return handle
    if not paths:
        raise SpecError("from_peft needs at least one PEFT adapter directory")
    adapters = [read_peft_lora(p) for p in paths]
    names = _resolve_modules(model, adapters)
    label = name or "peft_" + "+".join(Path(p).name for p in paths)
    if len(adapters) == 1 and router is None:
        if aux_losses:
            raise SpecError("aux_losses need a routed pool: pass a router (e.g. mf.TopKRouter(k=1))")
        spec, tensors = _lora_spec(adapters[0], names, label, model)
    else:
        spec, tensors = _pool_spec(adapters, names, label, router or StaticRouter(), list(aux_losses), frozen, seed)
    handle = compile(spec, model, passes=passes)
    handle.load_state_dict(tensors)
    return handle


def _resolve_modules(model: nn.Module, adapters: list[PeftLoRA]) -> dict[str, str]:
    """PEFT module name -> this model's module name (equal, or differing by a leading prefix)."""
    here = {n: m for n, m in model.named_modules()}
    out: dict[str, str] = {}
    problems: list[str] = []
    for ad in adapters:
        for peft_name, lora in ad.modules.items():
            found = [peft_name] if peft_name in here else [
                n for n in here if n.endswith("." + peft_name) or peft_name.endswith("." + n)]
            if len(found) != 1:
                problems.append(f"{ad.path}: module {peft_name!r} " + ("is not in this model" if not found else
                                f"matches several modules ({', '.join(found[:3])})"))
                continue
            dims = linear_dims(here[found[0]])
            want = (int(lora.a.shape[1]), int(lora.b.shape[0]))
            if dims != want:
                problems.append(f"{ad.path}: module {found[0]!r} is {type(here[found[0]]).__name__} {dims}, "
                                f"the LoRA factors need a linear (d_in, d_out) = {want}")
            out[peft_name] = found[0]
    if problems:
        raise CheckpointError(f"the PEFT adapter(s) do not fit this {type(model).__name__}:\n  - "
                              + "\n  - ".join(problems[:20]))
    return out


def _targets(modules: list[str]) -> Target:
    return Target(modules=[re.escape(m) for m in sorted(modules)])


def _lora_spec(ad: PeftLoRA, names: dict[str, str], label: str, model: nn.Module):
    groups: dict[tuple[int, float, bool, bool], list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for peft_name, lora in ad.modules.items():
        name = names[peft_name]
        groups.setdefault((lora.rank, lora.alpha, lora.rslora, lora.magnitude is not None), []).append(name)
        tensors[f"{name}.A"], tensors[f"{name}.B"] = lora.a, lora.b
        if lora.magnitude is not None:  # DoRA: the site stores m - ‖W‖ (zero at PEFT's initialisation of m)
            tensors[f"{name}.magnitude"] = lora.magnitude - _row_norms(model.get_submodule(name)).to(lora.magnitude)
    sites = [Site(target=_targets(mods),
                  adapter=LoRA(rank=r, alpha=alpha, scaling="rslora" if rs else "alpha_over_rank",
                               dropout=_dropout([ad]), magnitude=dora))
             for (r, alpha, rs, dora), mods in sorted(groups.items())]
    return AdapterSpec(name=label, description=f"imported from the PEFT LoRA {ad.path}", sites=sites), tensors


def _row_norms(module: nn.Module) -> torch.Tensor:
    """``‖W‖`` per output row of a linear (a ``Conv1D`` stores ``W`` transposed), ``(d_out,)``."""
    w = module.weight.detach()
    return torch.linalg.vector_norm(w if isinstance(module, nn.Linear) else w.t(), dim=1)


def _pool_spec(adapters: list[PeftLoRA], names: dict[str, str], label: str, router, aux, frozen: bool,
               seed: int | None):
    E = len(adapters)
    if any(lo.magnitude is not None for ad in adapters for lo in ad.modules.values()):
        raise CheckpointError("DoRA adapters (use_dora) import as LoRA sites, one adapter at a time; pool experts "
                              "have no magnitude vectors: import the adapter alone, without a router")
    per_module: dict[str, list] = {}
    for i, ad in enumerate(adapters):
        for peft_name, lora in ad.modules.items():
            per_module.setdefault(names[peft_name], [None] * E)[i] = lora
    groups: dict[tuple[int, float, str], list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for module, loras in per_module.items():
        present = [lo for lo in loras if lo is not None]
        R = max(lo.rank for lo in present)
        same = len(present) == E and len({(lo.rank, lo.alpha, lo.rslora) for lo in present}) == 1
        key = (R, present[0].alpha, "rslora" if present[0].rslora else "alpha_over_rank") if same else \
            (R, float(R), "alpha_over_rank")  # scale 1: each expert's own scale goes into its B
        groups.setdefault(key, []).append(module)
        tensors[f"{module}.A"], tensors[f"{module}.B"] = _stack(loras, R, fold=not same)
    sites = [Site(target=_targets(mods), init=Init(seed=seed),
                  adapter=ExpertPool(experts=E, rank=R, alpha=alpha, scaling=scaling, router=router,
                                     aux_losses=aux, frozen_experts=frozen, dropout=_dropout(adapters)))
             for (R, alpha, scaling), mods in sorted(groups.items())]
    desc = "experts imported from the PEFT LoRAs " + ", ".join(str(a.path) for a in adapters)
    return AdapterSpec(name=label, description=desc, sites=sites), tensors


def _stack(loras: list, R: int, fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (E, R, d_in)``, ``B (E, d_out, R)``: zero-padded ranks, zero experts where absent."""
    ref = next(lo for lo in loras if lo is not None)
    d_in, d_out = ref.a.shape[1], ref.b.shape[0]
    A = torch.zeros(len(loras), R, d_in, dtype=torch.float64)
    B = torch.zeros(len(loras), d_out, R, dtype=torch.float64)
    for i, lo in enumerate(loras):
        if lo is None:
            continue
        A[i, :lo.rank] = lo.a.to(torch.float64)
        B[i, :, :lo.rank] = lo.b.to(torch.float64) * (lo.scale if fold else 1.0)
    return A, B


# ---- reduction of compiled sites ------------------------------------------------------

def _site_tensors(handle: AdapterHandle, name: str) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The graph to reduce (the plain one when its tensors are the stored ones) and its tensors."""
    site = handle.modules[name].site
    stored = {d.name: getattr(site, d.name).detach() for d in handle.graphs[name].params}
    plain = handle.plain_graphs[name]
    fits = all(d.name in stored and tuple(stored[d.name].shape) == tuple(d.shape) for d in plain.params)
    return (plain if fits else handle.graphs[name]), stored


def _reduce_all(handle: AdapterHandle) -> tuple[dict[str, LowRank], dict[str, NotReducibleError]]:
    if not handle.active:
        raise CheckpointError("this adapter was removed from its model; nothing to export")
    done: dict[str, LowRank] = {}
    refused: dict[str, NotReducibleError] = {}
    with torch.no_grad():
        for name in handle.modules:
            graph, tensors = _site_tensors(handle, name)
            try:
                done[name] = reduce_site(graph, tensors)
            except NotReducibleError as e:
                refused[name] = e
    return done, refused


def _refusal(handle: AdapterHandle, refused: Mapping[str, NotReducibleError], what: str, instead: str) -> str:
    by_site: dict[int, list[str]] = {}
    for name in refused:
        by_site.setdefault(handle.site_of[name], []).append(name)
    lines = []
    for i, mods in sorted(by_site.items()):
        e = refused[mods[0]]
        more = f" (and {len(mods) - 1} more modules of sites[{i}])" if len(mods) > 1 else ""
        lines.append(f"module {mods[0]!r}{more}: {e}")
    dep = any(e.input_dependent for e in refused.values())
    why = "depend on the input (token-level routing)" if dep else "are not a fixed low-rank update"
    return f"cannot {what}: these sites {why}:\n  - " + "\n  - ".join(lines) + f"\n{instead}"


# ---- PEFT out --------------------------------------------------------------------------

_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"))


def _dropout(adapters: list[PeftLoRA]) -> float:
    """The adapters' ``lora_dropout`` when they agree, else 0."""
    values = {float(ad.config.get("lora_dropout") or 0.0) for ad in adapters}
    return values.pop() if len(values) == 1 else 0.0


def _site_dropout(handle: AdapterHandle) -> float:
    """PEFT has one ``lora_dropout``: the sites' common dropout (the most common one, with a
    warning, when they differ)."""
    values = [float(getattr(s.adapter, "dropout", 0.0)) for s in handle.spec.sites]
    if len(set(values)) > 1:
        warnings.warn(f"the sites' dropouts differ ({sorted(set(values))}); PEFT keeps one lora_dropout: "
                      f"writing the most common, {_most_common(values)}", stacklevel=3)
    return _most_common(values)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((t for suffix, t in _TASKS if cls.endswith(suffix)), None)


def export_peft(handle: AdapterHandle, path: PathLike) -> Path:
    """Write the adapter as a PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base_model, path)`` loads with the same logits.

    Works when every site is LoRA-reducible: plain LoRA (its own A, B, r and alpha), pools
    with static routers (CAT after training: one LoRA of rank ``E·r`` with the weights folded
    into B) and their shared experts. Ranks and alphas that differ per module go into
    ``rank_pattern`` / ``alpha_pattern``.

    Raises:
        NotMergeableError: a site routes on its input; the message names each such site and
            router and what to use instead.
    """
    if isinstance(handle, XLoRAHandle):
        return export_xlora_peft(handle, path, _task_type(handle.model))
    done, refused = _reduce_all(handle)
    magnitudes = _dora_sites(handle, done, refused)
    if refused:
        raise NotMergeableError(_refusal(
            handle, refused, "export as a PEFT LoRA",
            "A token-routed mixture is not one LoRA. Use mf.export_merged(handle, path, static_only=True) to fold "
            "the input-independent sites into the base weights and keep the routed ones as a moleforge adapter, "
            "or mf.save(handle, path) to keep the whole adapter."))
    factors, ranks, alphas = {}, {}, {}
    for name, lr in done.items():
        dtype = next(t.dtype for t in handle.modules[name].site.state_dict().values() if t.is_floating_point())
        factors[name] = (lr.a.to(dtype), lr.b.to(dtype))
        ranks[name], alphas[name] = lr.rank, lr.scale * lr.rank
    conv1d = any(not isinstance(handle.modules[n].base_layer, nn.Linear) for n in done)
    base = getattr(getattr(handle.model, "config", None), "_name_or_path", None) or None
    config = lora_config(ranks, alphas, fan_in_fan_out=conv1d, task_type=_task_type(handle.model), base_model=base,
                         dropout=_site_dropout(handle))
    if magnitudes and len(magnitudes) != len(done):
        raise NotMergeableError(f"PEFT keeps one use_dora for every module: {len(magnitudes)} of {len(done)} sites "
                                "have DoRA magnitudes; export the DoRA sites and the others as separate adapters")
    config["use_dora"] = bool(magnitudes)
    return write_peft_lora(path, config, factors, magnitudes)


def _dora_sites(handle: AdapterHandle, done: dict[str, LowRank], refused: dict[str, NotReducibleError]) -> dict:
    """DoRA LoRA sites (refused by the low-rank reduction: they rescale the frozen rows) move from
    ``refused`` to ``done`` with their own ``A``, ``B`` and scale; returns PEFT's ``m = ‖W‖ + magnitude``."""
    out = {}
    for name in list(refused):
        dora = next((n for n in handle.plain_graphs[name].nodes if isinstance(n, Magnitude)), None)
        if dora is None or handle.plain_graphs[name].output != dora.id:
            continue
        site = handle.modules[name]
        A, B, dm = (getattr(site.site, r.name).detach() for r in (dora.a, dora.b, dora.magnitude))
        done[name] = LowRank(scale=dora.scale, a=A, b=B)
        out[name] = _row_norms(site.base_layer).to(dm) + dm
        del refused[name]
    return out


# ---- merged out ------------------------------------------------------------------------

def export_merged(handle: AdapterHandle, path: PathLike, *, static_only: bool = False,
                  max_shard_size: int | str = "5GB") -> Path:
    """Fold the adapter into the base weights and write a standard HuggingFace model directory
    (``config.json`` + ``model.safetensors``, sharded with ``model.safetensors.index.json`` past
    ``max_shard_size``) that ``AutoModel*.from_pretrained(path)`` loads without moleforge.

    Every input-independent site (plain LoRA, static-gated pools) becomes ``W + s·B·A``
    (``W [out, in]``; GPT-2 ``Conv1D`` stores ``[in, out]`` and gets the transpose), computed in
    float64 and cast to the weight's dtype. The user's model is not changed.

    Args:
        static_only: merge the input-independent sites and save the others (whole sites, their
            static parts included) as a moleforge adapter in the same directory:
            ``mf.load(AutoModelForCausalLM.from_pretrained(path), path)`` restores the adapted model.
        max_shard_size: bytes, or text such as ``"5GB"``.
    Raises:
        NotMergeableError: a site routes on its input (without ``static_only``), naming each site
            and router; or a merged module's weight is tied to another.
        CheckpointError: ``path`` holds a moleforge adapter that a full merge would leave stale.
    """
    if isinstance(handle, XLoRAHandle):
        raise NotMergeableError(xlora_not_mergeable(handle))
    done, refused = _reduce_all(handle)
    if refused and not static_only:
        raise NotMergeableError(_refusal(
            handle, refused, "merge into the base weights",
            "Pass static_only=True to merge the input-independent sites and save the routed ones as a moleforge "
            "adapter next to the merged weights, or keep the adapter with mf.save(handle, path)."))
    kept_sites = sorted({handle.site_of[n] for n in refused})
    merge = {n: lr for n, lr in done.items() if handle.site_of[n] not in kept_sites}
    out = Path(path)
    if not kept_sites and ((out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()):
        raise CheckpointError(f"{out} holds a moleforge adapter ({CONFIG_NAME}); a fully merged model there would "
                              "be loaded with it again: choose another directory or delete those files")
    tensors = _merged_state(handle, merge)
    write_hf_model(out, tensors, _json_files(handle.model, tensors), max_shard_size)
    if kept_sites:
        _save_rest(handle, kept_sites, out)
    return out


def _merged_state(handle: AdapterHandle, merge: Mapping[str, LowRank]) -> dict[str, torch.Tensor]:
    """The model's state dict under its original names (adapters unwrapped), merged sites folded."""
    state: dict[str, torch.Tensor] = {}
    for key, t in _dequantized_state(handle.model).items():
        module, sep, rest = key.partition(".base_layer.")
        if sep and module in handle.modules:
            key = f"{module}.{rest}"
        elif key.partition(".site.")[0] in handle.modules:
            continue
        state[key] = t
    owners: dict[tuple, list[str]] = {}
    for key, t in state.items():
        owners.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    for name, lr in merge.items():
        key = f"{name}.weight"
        tied = [k for k in owners[(state[key].untyped_storage().data_ptr(), state[key].storage_offset(),
                                   tuple(state[key].shape))] if k != key]
        if tied:
            raise NotMergeableError(f"module {name!r}: its weight is tied to {tied[0]!r}; merging into one would "
                                    "change both. Target other modules, or untie the weights first")
        transposed = not isinstance(handle.modules[name].base_layer, nn.Linear)
        state[key] = fold_delta(state[key], lr.delta_weight(), transposed)
    return dedupe_shared(state)


def _dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantised linear's weight as the floating-point ``W`` it
    computes with, and its quantisation data (scales, code books) left out."""
    quantized = {f"{name}.": mod for name, mod in quantized_modules(model).items()}
    state = {}
    for key, t in model.state_dict().items():
        prefix = next((p for p in quantized if key.startswith(p)), None)
        if prefix is None:
            state[key] = t
        elif key == f"{prefix}weight":
            state[key] = dequantized(quantized[prefix]).detach()
        elif key == f"{prefix}bias":
            state[key] = t
    return state


def _json_files(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):  # the weights are written dequantised
        del config.quantization_config
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats:  # from_pretrained(dtype="auto") loads the weights in the dtype they were saved in
        config.dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    files = {"config.json": config.to_json_string()}
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        files["generation_config.json"] = gen.to_json_string()
    return files


def _save_rest(handle: AdapterHandle, kept_sites: list[int], out: Path) -> None:
    """The routed sites as a moleforge adapter (``mf.load`` reads it)."""
    index = {old: new for new, old in enumerate(kept_sites)}
    spec = handle.spec.model_copy(update={"sites": [handle.spec.sites[i] for i in kept_sites]})
    names = [n for n in handle.modules if handle.site_of[n] in index]
    tensors = {f"{n}.{d.name}": getattr(handle.modules[n].site, d.name) for n in names for d in handle.graphs[n].params}
    sites = {n: {"site": index[handle.site_of[n]], "params": {d.name: list(d.shape) for d in handle.graphs[n].params}}
             for n in names}
    write_adapter(out, {"spec": spec.model_dump(mode="json"), "base_model": type(handle.model).__name__,
                        "sites": sites}, tensors)
