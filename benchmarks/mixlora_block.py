"""MixLoRA train step (forward + backward) on a small Llama: moleforge's routed FFN blocks
against the ``mixlora`` package's injection of the same adapter, and the frozen base.

    python benchmarks/mixlora_block.py [--steps 7] [--vocab 32000]

Model: the Llama of ``benchmarks/train_step.py``, from ``LlamaConfig(hidden_size=512,
intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)`` (vocabulary 32000),
batch 4 × 256 tokens, float32, 2 threads, evaluation mode (no dropout). Adapter: MixLoRA E = 8, top-2,
r = 8, alpha 16 on gate/up/down of every FFN block, plain LoRA r = 8 on q/k/v/o, written in
the package's format with random non-zero weights and loaded by both. The frozen base
back-propagates to its input embeddings, and so do the adapted models, so the three do the
same backward through the frozen base. Steps of the three variants are interleaved; the
medians and their ratios to the frozen base are printed and written to
``benchmarks/results/mixlora_block.json``. Then, unless ``--cpu-steps 0``, the same steps are
timed as CPU time on one thread, a measure other processes on the machine disturb less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import moleforge as mf  # noqa: E402

HIDDEN, LAYERS, HEADS, FFN, BATCH, SEQ = 512, 4, 8, 1408, 4, 256
E, K, R, ALPHA = 8, 2, 8, 16


def base_model(vocab: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, vocab_size=vocab)
    model = tf.LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def write_adapter(directory: Path) -> None:
    """A MixLoRA adapter in the package's format, every tensor random and non-zero."""
    config = dict(peft_type="MIXLORA", task_type="CAUSAL_LM", base_model_name_or_path="benchmark", r=R,
                  lora_alpha=ALPHA, lora_dropout=0.05, routing_strategy="mixlora", num_experts=E, top_k=K,
                  act_fn="silu", router_aux_loss_coef=0.01,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"])
    (directory / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(1)
    attn = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
            "o_proj": (HIDDEN, HIDDEN)}
    mlp = {"gate_proj": (HIDDEN, FFN), "up_proj": (HIDDEN, FFN), "down_proj": (FFN, HIDDEN)}
    w = {}
    for i in range(LAYERS):
        for p, (d_in, d_out) in attn.items():
            key = f"mixlora.layers.{i}.self_attn.{p}"
            w[f"{key}.lora_A.weight"] = torch.randn(R, d_in, generator=gen) / d_in ** 0.5
            w[f"{key}.lora_B.weight"] = torch.randn(d_out, R, generator=gen) * 0.02
        for p, (d_in, d_out) in mlp.items():
            for e in range(E):
                key = f"mixlora.layers.{i}.mlp.{p}.experts.{e}"
                w[f"{key}.lora_A.weight"] = torch.randn(R, d_in, generator=gen) / d_in ** 0.5
                w[f"{key}.lora_B.weight"] = torch.randn(d_out, R, generator=gen) * 0.02
        w[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E, HIDDEN, generator=gen) * 0.02
    torch.save(w, directory / "adapter_model.bin")


def package_model(vocab: int, directory: Path) -> tf.LlamaForCausalLM:
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    model = base_model(vocab)
    config, weights = load_adapter_weights(str(directory), device="cpu")
    inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # the experts are not registered submodules: set them apart
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


def step(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    for p in model.parameters():
        p.grad = None
    t0 = clock()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return clock() - t0


def interleaved(variants: dict, ids: torch.Tensor, rounds: int, warmup: int, clock) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + rounds):
        for name, model in variants.items():
            t = step(model, ids, clock)
            if i >= warmup:
                times[name].append(t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000,
                    help="LlamaConfig's default, as benchmarks/train_step.py")
    ap.add_argument("--cpu-steps", type=int, default=5,
                    help="then also time this many steps as CPU time on 1 thread (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mixlora_block.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, args.vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))

    frozen = base_model(args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(Path(tmp))
        ours = base_model(args.vocab)
        handle = mf.import_mixlora(ours, tmp)
        theirs = package_model(args.vocab, Path(tmp))
    for model in (frozen, ours, theirs):  # the same backward through the whole frozen base for all three
        model.enable_input_require_grads()
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    variants = {"frozen_base": frozen, "moleforge_mixlora": ours, "mixlora_package": theirs}
    load_before = os.getloadavg()
    times = interleaved(variants, ids, args.steps, args.warmup, time.perf_counter)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["frozen_base"] for k in med}
    load_after = os.getloadavg()
    cpu = {}
    if args.cpu_steps:
        torch.set_num_threads(1)
        cpu_times = interleaved(variants, ids, args.cpu_steps, 1, time.thread_time)
        cpu = {k: min(v) for k, v in cpu_times.items()}
    result = {
        "benchmark": "mixlora_block", "what": "forward+backward train step, median seconds",
        "model": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "intermediate": FFN,
                  "vocab": args.vocab, "tokens": BATCH * SEQ, "batch": BATCH, "seq": SEQ, "dtype": "float32"},
        "adapter": {"experts": E, "top_k": K, "rank": R, "alpha": ALPHA, "attention_lora": "q,k,v,o r=8"},
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "load_average_1min": {"before": load_before[0], "after": load_after[0], "cpus": os.cpu_count()},
        "cpu_time_1_thread": {
            "what": "CPU seconds of the step on one thread (time.thread_time), minimum over steps: less "
                    "sensitive to other processes than wall time",
            "min_s": cpu, "ratio_to_frozen_base": {k: cpu[k] / cpu["frozen_base"] for k in cpu}},
        "median_s": med, "ratio_to_frozen_base": ratios, "all_s": times,
        "max_abs_logit_diff_moleforge_vs_package": diff,
        "trainable_parameters_moleforge": sum(p.numel() for p in handle.trainable_parameters()),
        "versions": {"torch": torch.__version__, "transformers": tf.__version__, "moleforge": mf.__version__},
    }
    for k in med:
        print(f"{k:>20}: {med[k] * 1000:8.1f} ms  x{ratios[k]:.2f}")
    print(f"max |logits(moleforge) - logits(package)| = {diff:.2e}")
    print(f"load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs: "
          "other processes on the machine slow the step, the many small ops of adapters most")
    for k in cpu:
        print(f"{k:>20}: {cpu[k] * 1000:8.1f} ms CPU on 1 thread  x{cpu[k] / cpu['frozen_base']:.2f}")
    os.makedirs(Path(args.out).parent, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
