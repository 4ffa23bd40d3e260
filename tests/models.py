"""Tiny HF models built from configs (no downloads): one per supported family."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64


def tiny(arch: str, seed: int = 0, layers: int = 2):
    """A small randomly initialised model of ``arch``, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    match arch:
        case "llama":
            m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
        case "qwen2":
            m = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
        case "mistral":
            m = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=layers, num_attention_heads=4,
                                                       num_key_value_heads=2, **common))
        case "gpt2":
            m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common))
        case "bert":
            m = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                 num_attention_heads=4, max_position_embeddings=64, **common))
        case _:
            raise ValueError(arch)
    return m.eval()


ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert")


def batch(seed: int = 1, B: int = 2, S: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))
