"""Train-step time of a small Llama with each adapter, as ratios to the frozen base.

One forward + backward step (``model(input_ids, labels=input_ids).loss.backward()``) of a Llama
built from ``LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
num_attention_heads=8)`` (every other field at its default: vocabulary 32000, 8 key/value
heads), batch 4 x 256 tokens, float32, ``torch.set_num_threads(2)``. Configurations:

- ``frozen_base``: the model alone;
- ``peft_lora_r16``: PEFT LoRA r = 16 on all 7 projections;
- ``molora_passes_off`` / ``molora_passes_on``: moleforge ``molora`` (E = 8, k = 2, r = 8, all 7
  projections) compiled with ``passes=()`` and with the default pipeline;
- ``naive_loop_molora``: the same topology as a plain per-expert Python loop (the way most
  MoE-LoRA code is written), defined below;
- ``hydralora`` (4 heads, r = 8, FFN) and ``peft_lora_ffn_same_params``: PEFT LoRA on the same
  FFN projections with the rank that gives the same number of trainable parameters;
- ``smore`` (2 levels x 4 experts, fanout 2-2, rank 8, FFN) and ``peft_lora_ffn_r64``: a LoRA
  of S'MoRE's total rank d_L = 64 on the same projections.
- ``dynmole``: the preset (6 rank-24 experts, top-p 0.75 ∪ top-2, entropy broadcast, FFN), and
  ``naive_loop_dynmole``: the same topology as the official code writes it (every expert runs,
  with masked weights), defined below;
- ``dynmole_p08``: DynMoLE's router at p = 0.8 (least k 1, entropy threshold 0.9, both losses) over
  molora's pools (E = 8, r = 8, all 7 projections), and ``molora_same_mean_k``: molora with top-k,
  k the mean number of experts per token that ``dynmole_p08`` routes on the benchmark batch
  (rounded; measured before timing and printed), side by side in the same run;
- ``comol`` (8 cores of rank 8 on q/k/v/o and down) and ``mora_cl`` (8 rank-1 experts, one task,
  all 7 projections): the presets;
- ``deepseek_mole`` (16 routed rank-2 experts, top-4, plus 2 shared rank-4 experts, FFN) and
  ``flexmore`` (6 experts of ranks 2-2-4-4-8-8, top-2, all 7 projections);
- ``ept``: the preset with kernels 2-2-4-4-8-8-8-8 (6 divides neither width; 8 Kronecker experts
  over a rank-8 meta-seed, top-2 at τ = 0.05, all 7 projections; called without task ids, so the
  token alone routes), and ``naive_loop_ept``: the same topology as a per-expert loop that forms
  each ``ΔW_i = Z_i ⊗ K_i`` and applies it to the expert's gathered tokens, defined below.

Every configuration backpropagates to the input embeddings (``enable_input_require_grads``):
the frozen base then has a backward pass, and all configurations do the same base work.
Every step of a configuration runs right after a step of the frozen base, and its ratio is the
median over ``--rounds`` rounds (after ``--warmup`` untimed ones) of its time over that
paired base step; configurations rotate their order round by round. Pairing cancels the slow
drifts of a shared machine's speed; still compare ratios measured in one run, not across runs.

    python benchmarks/train_step.py                 # writes benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import moleforge as mf  # noqa: E402
from moleforge.interop.atomic import atomic_write  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def _init_experts(module: nn.Module, base: nn.Linear, experts: int, rank: int, alpha: float,
                  sink: list | None) -> None:
    """The frozen ``base``, a router and ``experts`` LoRA pairs (B drawn non-zero), as plain modules."""
    module.base, module.scale, module.sink = base, alpha / rank, sink
    module.router = nn.Linear(base.in_features, experts, bias=False)
    module.lora_a = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False) for _ in range(experts))
    module.lora_b = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False) for _ in range(experts))
    for b in module.lora_b:
        nn.init.normal_(b.weight, std=0.02)


class NaiveMoLoRA(nn.Module):
    """MoE-LoRA around a frozen linear, written the usual way: a softmax top-k router, then a
    Python loop over experts, each gathering its tokens, running its two small linears and
    scattering the gated result back; plus the Switch load-balancing loss."""

    def __init__(self, base: nn.Linear, experts: int = 8, k: int = 2, rank: int = 8, alpha: float = 16,
                 aux_weight: float = 0.01, sink: list | None = None):
        super().__init__()
        _init_experts(self, base, experts, rank, alpha, sink)
        self.k, self.aux_weight = k, aux_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
        probs = torch.softmax(self.router(flat), dim=-1)  # (T, E)
        top, index = probs.topk(self.k, dim=-1)  # (T, k)
        top = top / top.sum(-1, keepdim=True)
        out = self.base(flat)  # (T, d_out)
        for e, (a, b) in enumerate(zip(self.lora_a, self.lora_b)):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            y = b(a(flat[token])) * (top[token, slot, None] * self.scale)  # (n_e, d_out)
            out = out.index_add(0, token, y)
        if self.sink is not None:
            E = probs.shape[-1]
            counts = torch.bincount(index.reshape(-1), minlength=E).to(probs.dtype)
            self.sink.append(self.aux_weight * E * torch.sum(counts / flat.shape[0] * probs.mean(0)))
        return out.reshape(*x.shape[:-1], -1)


class NaiveDynMoLE(nn.Module):
    """DynMoLE around a frozen linear as its official code writes it (mikecovlee/DynMoLE): softmax,
    the top-p ∪ top-k mask with the Tsallis-entropy broadcast, then a Python loop over every expert
    with the masked (zero where not kept) weights; plus the entropy and soft-count balance losses."""

    def __init__(self, base: nn.Linear, experts: int = 6, rank: int = 24, alpha: float = 48, top_p: float = 0.75,
                 k: int = 2, q: float = 1.1, threshold: float = 0.9, sink: list | None = None):
        super().__init__()
        _init_experts(self, base, experts, rank, alpha, sink)
        self.top_p, self.k, self.q, self.threshold = top_p, k, q, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
        probs = torch.softmax(self.router(flat), dim=-1)  # (T, E)
        E = probs.shape[-1]
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) < self.top_p).roll(1, -1)  # the prefix reaching top_p
        keep[:, 0] = True
        keep[:, :self.k] = True
        entropy = (1 - probs.pow(self.q).sum(-1)) / (1 - E ** (1 - self.q))  # (T,)
        mask = torch.zeros_like(probs).scatter(-1, order, keep.to(probs.dtype))
        mask[entropy > self.threshold] = 1.0
        weights = probs * mask  # (T, E)
        out = self.base(flat)  # (T, d_out)
        for e, (a, b) in enumerate(zip(self.lora_a, self.lora_b)):
            out = out + weights[:, e:e + 1] * b(a(flat)) * self.scale
        if self.sink is not None:
            self.sink.append(0.01 * entropy.mean() + 0.001 * E * torch.sum(weights.mean(0) * probs.mean(0)))
        return out.reshape(*x.shape[:-1], -1)


class NaiveEPT(nn.Module):
    """EPT around a frozen linear written the usual way: a softmax top-k router at temperature τ,
    then a Python loop over experts, each forming its ``ΔW_i = (B_m[:h] A_m[:, :w]) ⊗ K_i``
    (``d_out × d_in``) and applying it to its gathered tokens."""

    def __init__(self, base: nn.Linear, kernels: tuple[int, ...] = (2, 2, 4, 4, 8, 8, 8, 8), rank: int = 8,
                 alpha: float = 16, k: int = 2, tau: float = 0.05, sink: list | None = None):
        super().__init__()
        self.base, self.k, self.tau, self.scale, self.kernels = base, k, tau, alpha / rank, kernels
        d_in, d_out, s0 = base.in_features, base.out_features, min(kernels)
        self.router = nn.Linear(d_in, len(kernels), bias=False)
        self.meta_a = nn.Parameter(torch.randn(rank, d_in // s0) / (d_in // s0) ** 0.5)
        self.meta_b = nn.Parameter(torch.randn(d_out // s0, rank) / rank ** 0.5)
        self.kernel = nn.ParameterList(nn.Parameter(torch.randn(s, s) * 0.02) for s in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
        probs = torch.softmax(self.router(flat) / self.tau, dim=-1)  # (T, E)
        top, index = probs.topk(self.k, dim=-1)  # (T, k)
        top = top / top.sum(-1, keepdim=True)
        out = self.base(flat)  # (T, d_out)
        d_in, d_out = flat.shape[-1], out.shape[-1]
        for e, (s, kernel) in enumerate(zip(self.kernels, self.kernel)):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            delta = torch.kron(self.meta_b[:d_out // s] @ self.meta_a[:, :d_in // s], kernel)  # (d_out, d_in)
            out = out.index_add(0, token, (flat[token] @ delta.T) * (top[token, slot, None] * self.scale))
        return out.reshape(*x.shape[:-1], -1)


def _ept_benchmark() -> mf.AdapterSpec:
    """The ``ept`` preset with kernels 2-2-4-4-8-8-8-8: 6 divides neither 512 nor 1408."""
    data = mf.presets.load("ept").model_dump()
    data["sites"][0]["adapter"]["kernels"] = [2, 2, 4, 4, 8, 8, 8, 8]
    return mf.AdapterSpec.model_validate({**data, "name": "ept_benchmark"})


class NaiveModel(nn.Module):
    """The base model with a naive layer (:class:`NaiveMoLoRA`) on every projection of ``projections``;
    aux losses added to the loss."""

    def __init__(self, model: nn.Module, layer: type = NaiveMoLoRA, projections: list[str] = PROJECTIONS):
        super().__init__()
        self.model, self.sink = model, []
        for p in model.parameters():
            p.requires_grad_(False)
        for module in list(model.modules()):
            for child in projections:
                if isinstance(getattr(module, child, None), nn.Linear):
                    setattr(module, child, layer(getattr(module, child), sink=self.sink))

    def forward(self, **kwargs):
        self.sink.clear()
        out = self.model(**kwargs)
        out["loss"] = out.loss + sum(self.sink)
        return out

    def enable_input_require_grads(self):
        self.model.enable_input_require_grads()


def build_base(vocab: int) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                            vocab_size=vocab)
    model = tf.LlamaForCausalLM(config).float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _peft(base: nn.Module, rank: int, targets: list[str]) -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                     target_modules=targets, lora_dropout=0.0))


def _moleforge(base: nn.Module, preset: str | mf.AdapterSpec, **kw) -> nn.Module:
    model = copy.deepcopy(base)
    spec = (mf.presets.load(preset) if isinstance(preset, str) else preset).with_init(
        mf.Init(up="normal", std=0.02, seed=0))
    mf.compile(spec, model, **kw)
    return model


def _same_params_rank(base: nn.Module) -> int:
    """Rank of a LoRA on the FFN projections with hydralora's number of trainable parameters."""
    hydra = mf.count_parameters("hydralora", base)
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in FFN)
    return max(1, round(hydra / per_rank))


def _dynmole_p08() -> mf.AdapterSpec:
    """molora's topology (E = 8, r = 8, alpha 16, all 7 projections) under DynMoLE's router at p = 0.8."""
    return mf.AdapterSpec.model_validate({"name": "dynmole_p08", "sites": [{
        "target": {"roles": ["q", "k", "v", "o", "gate", "up", "down"]},
        "adapter": {"kind": "pool", "experts": 8, "rank": 8, "alpha": 16,
                    "router": {"kind": "top_p", "p": 0.8, "k": 1},
                    "aux_losses": [{"kind": "tsallis_entropy", "weight": 0.01},
                                   {"kind": "soft_lb", "weight": 0.001}]}}]})


def mean_experts_per_token(base: nn.Module, ids: torch.Tensor) -> float:
    """Experts per token that ``dynmole_p08`` routes on ``ids``, averaged over its sites."""
    model = copy.deepcopy(base)
    handle = mf.compile(_dynmole_p08().with_init(mf.Init(up="normal", std=0.02, seed=0)), model)
    with handle.record_routing() as log, torch.no_grad():
        model(input_ids=ids)
    counts = [float((r.gates != 0).sum(-1).float().mean()) for _, routes in log.entries for r in routes.values()]
    return sum(counts) / len(counts)


def _molora_k(k: int) -> mf.AdapterSpec:
    spec = mf.presets.load("molora")
    data = spec.model_dump()
    data["sites"][0]["adapter"]["router"]["k"] = k
    return mf.AdapterSpec.model_validate({**data, "name": f"molora_k{k}"})


def build_configs(base: nn.Module, only: set[str] | None, mean_k: float | None = None) -> dict[str, nn.Module]:
    makers = {
        "frozen_base": lambda: copy.deepcopy(base),
        "peft_lora_r16": lambda: _peft(base, 16, PROJECTIONS),
        "molora_passes_off": lambda: _moleforge(base, "molora", passes=()),
        "molora_passes_on": lambda: _moleforge(base, "molora"),
        "naive_loop_molora": lambda: NaiveModel(copy.deepcopy(base)),
        "hydralora": lambda: _moleforge(base, "hydralora"),
        "peft_lora_ffn_same_params": lambda: _peft(base, _same_params_rank(base), FFN),
        "smore": lambda: _moleforge(base, "smore"),
        "peft_lora_ffn_r64": lambda: _peft(base, 64, FFN),
        "dynmole": lambda: _moleforge(base, "dynmole"),
        "naive_loop_dynmole": lambda: NaiveModel(copy.deepcopy(base), NaiveDynMoLE, FFN),
        "comol": lambda: _moleforge(base, "comol"),
        "mora_cl": lambda: _moleforge(base, "mora_cl"),
        "dynmole_p08": lambda: _moleforge(base, _dynmole_p08()),
        "molora_same_mean_k": lambda: _moleforge(base, _molora_k(max(1, round(mean_k or 2)))),
        "deepseek_mole": lambda: _moleforge(base, "deepseek_mole"),
        "flexmore": lambda: _moleforge(base, "flexmore"),
        "ept": lambda: _moleforge(base, _ept_benchmark()),
        "naive_loop_ept": lambda: NaiveModel(copy.deepcopy(base), NaiveEPT),
    }
    out = {}
    for name, make in makers.items():
        if only is None or name in only or name == "frozen_base":
            model = make()
            model.enable_input_require_grads()
            out[name] = model.train()
    return out


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(input_ids=ids, labels=ids).loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for p in model.parameters():
        p.grad = None
    return wall, cpu


def measure(configs: dict[str, nn.Module], ids: torch.Tensor, rounds: int, warmup: int) -> dict[str, dict]:
    """Steps of every configuration, each right after a step of the frozen base (kept as its
    pair), the order of configurations rotating round by round."""
    names = [n for n in configs if n != "frozen_base"]
    samples = {"frozen_base": {"wall": [], "cpu": []}}
    samples.update({n: {"wall": [], "cpu": [], "base_wall": [], "base_cpu": []} for n in names})
    for r in range(warmup + rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            base_wall, base_cpu = step(configs["frozen_base"], ids)
            wall, cpu = step(configs[name], ids)
            if r >= warmup:
                for key, value in (("wall", wall), ("cpu", cpu), ("base_wall", base_wall), ("base_cpu", base_cpu)):
                    samples[name][key].append(value)
                samples["frozen_base"]["wall"].append(base_wall)
                samples["frozen_base"]["cpu"].append(base_cpu)
    return samples


def _paired(s: dict, key: str) -> float:
    """Median over rounds of a configuration's step time over its paired frozen-base step."""
    if "base_" + key not in s:
        return 1.0
    return statistics.median(t / b for t, b in zip(s[key], s["base_" + key]))


def report(configs, samples, args, load_before) -> dict:
    results = {}
    print(f"\n{'configuration':28s} {'median ms':>10s} {'ratio':>7s} {'cpu ratio':>9s} {'trainable':>11s}")
    for name, s in samples.items():
        wall, ratio, cpu_ratio = statistics.median(s["wall"]), _paired(s, "wall"), _paired(s, "cpu")
        results[name] = {"median_ms": wall * 1e3, "ratio_to_frozen_base": ratio,
                         "cpu_ratio_to_frozen_base": cpu_ratio, "trainable_parameters": trainable(configs[name]),
                         "wall_ms": [t * 1e3 for t in s["wall"]], "cpu_ms": [t * 1e3 for t in s["cpu"]]}
        print(f"{name:28s} {wall * 1e3:10.1f} {ratio:6.3f}x {cpu_ratio:8.3f}x {trainable(configs[name]):11,d}")
    return {
        "benchmark": "train_step", "config": {
            "model": "LlamaForCausalLM", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
            "num_attention_heads": 8, "vocab_size": args.vocab, "batch": args.batch, "seq": args.seq,
            "dtype": "float32", "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup},
        "ratio": "median over rounds of (step time / the frozen-base step run just before it), in one run",
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": list(os.getloadavg())},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (LlamaConfig default 32000)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="configurations to run (the frozen base always runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    base = build_base(args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    only = set(args.only) if args.only else None
    mean_k = mean_experts_per_token(base, ids) if only is None or "molora_same_mean_k" in only else None
    if mean_k is not None:
        print(f"dynmole_p08 routes {mean_k:.2f} experts per token on average: molora_same_mean_k uses "
              f"k = {max(1, round(mean_k))}")
    configs = build_configs(base, only, mean_k)
    samples = measure(configs, ids, args.rounds, args.warmup)
    result = report(configs, samples, args, load_before)
    result["dynmole_p08_mean_experts_per_token"] = mean_k
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
