"""Tiny HF models built from configs (no downloads): one per supported family."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64


def tiny(arch: str, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A small randomly initialised model of ``arch`` (width ``hidden``, FFN ``2·hidden``), in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    h, ff = hidden, 2 * hidden
    match arch:
        case "llama":
            m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
        case "qwen2":
            m = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
        case "mistral":
            m = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=h, intermediate_size=ff,
                                                       num_hidden_layers=layers, num_attention_heads=4,
                                                       num_key_value_heads=2, **common))
        case "gpt2":
            m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=h, n_layer=layers, n_head=4, n_positions=64, **common))
        case "bert":
            m = tf.BertForMaskedLM(tf.BertConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                                 num_attention_heads=4, max_position_embeddings=64, **common))
        case _:
            raise ValueError(arch)
    return m.eval()


ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert")


def batch(seed: int = 1, B: int = 2, S: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def kernel_choices_agree(spec, passes=None, code: str = "") -> None:
    """A tiny Llama with ``spec`` compiled in gives the same logits and adapter gradients with
    the Triton kernels (compiled with ``MOLEFORGE_TRITON=1``) as with the torch ops (``=0``); every
    generated site's code contains ``code``. The forward runs with the variable set the other way:
    the policy read at compile time decides."""
    import pytest

    import moleforge as mf
    from tolerances import assert_close

    results = []
    for flag, other in (("0", "1"), ("1", "0")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MOLEFORGE_TRITON", flag)
            model = tiny("llama")
            handle = mf.compile(spec, model, passes=passes)
            assert all(code in m.site.code for m in handle.modules.values())
            assert {m.site.kernel_policy.triton for m in handle.modules.values()} == {"on" if flag == "1" else "off"}
            mp.setenv("MOLEFORGE_TRITON", other)
            logits = model(input_ids=batch()).logits
            logits.square().mean().backward()
        results.append((logits.detach(), [p.grad for p in handle.trainable_parameters()]))
    (l0, g0), (l1, g1) = results
    assert_close(l1, l0, "float32_model")
    assert all(g is not None for g in g0) and any(g.abs().max() > 0 for g in g0)
    for got, want in zip(g1, g0):
        assert_close(got, want, "float32_model")


def assert_reloads_to_the_same_logits(model, handle, ids: torch.Tensor, arch: str, folder, hidden: int = 32,
                                      **inputs) -> None:
    """``mf.save`` of ``handle``, loaded into a fresh ``tiny(arch, hidden=hidden)``, gives ``model``'s
    evaluation logits on ``ids`` (and ``inputs``, such as ``task_ids``) exactly."""
    import moleforge as mf

    model.eval()
    with torch.no_grad():
        want = model(ids, **inputs).logits
    mf.save(handle, folder)
    fresh = tiny(arch, hidden=hidden)
    mf.load(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(ids, **inputs).logits, want)


def decode_llama() -> torch.nn.Module:
    """A small Llama (hidden 64, 2 layers, vocabulary 128) in evaluation mode, for decoding tests."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    return tf.LlamaForCausalLM(config).eval()


def kernel_and_torch_ops(spec, kernel_policy) -> tuple[torch.nn.Module, torch.nn.Module]:
    """:func:`decode_llama` with ``spec`` compiled under ``kernel_policy`` and, on a copy, with the
    CPU kernels and Triton off."""
    import copy

    import moleforge as mf
    from moleforge.backends.runtime.policy import KernelPolicy

    base = decode_llama()
    with_kernel, without = copy.deepcopy(base), copy.deepcopy(base)
    mf.compile(spec, with_kernel, policy=kernel_policy)
    mf.compile(spec, without, policy=KernelPolicy(triton="off", cpu="off"))
    return with_kernel, without


def greedy(model: torch.nn.Module, ids: torch.Tensor, new: int = 6):
    """Greedy generation of ``new`` tokens with the KV cache, its logits kept."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def assert_same_generation(a, b) -> None:
    """The same tokens, and logits within 1e-5, of two :func:`greedy` outputs."""
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
