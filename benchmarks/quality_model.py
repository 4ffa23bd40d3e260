"""The model side of the quality benchmark: loading, encoding, and training the top layers on
cached inputs.

The frozen layers below the first adapted one compute the same thing at every step, so
:class:`TopLayers` runs them once per example (``cache``) and then runs only the top layers,
from those cached hidden states (``inputs_embeds`` of a model whose layer list is cut to the
top). Batches are left-padded, so every answer ends at the last position and the LM head runs
on the answer positions only (``logits_to_keep``); RoPE depends on relative positions only, so
the shift that left padding gives a sequence changes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Encoded", "encode", "load_model", "TopLayers"]

ANSWER_CUE = "\nAnswer:"


@dataclass
class Encoded:
    task: str
    ids: list[int]
    targets: int
    """How many tokens at the end are predicted (the answer and the end-of-text token)."""
    hidden: torch.Tensor | None = None
    """``(len(ids), d)``: the input of the first adapted layer, once cached."""


def encode(examples, tokenizer) -> list[Encoded]:
    out = []
    for e in examples:
        prompt = tokenizer(e.prompt + ANSWER_CUE)["input_ids"]
        answer = tokenizer(" " + e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Encoded(e.task, prompt + answer, len(answer)))
    return out


def _tiny(splits) -> tuple[nn.Module, object]:
    """A random 2-layer Llama over a word-level vocabulary of the tasks: runs anywhere, learns
    little; for smoke runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for part in splits.values() for e in part for w in f"{e.prompt}{ANSWER_CUE} {e.answer}".split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config), tokenizer


def load_model(name: str, splits) -> tuple[nn.Module, object, str]:
    """``(model, tokenizer, description)``, frozen, float32, eval mode."""
    if name == "tiny":
        model, tokenizer = _tiny(splits)
        label = "tiny random Llama (smoke run)"
    else:
        from moleforge.pretrained import load_smollm2

        model, tokenizer = load_smollm2()
        label = "SmolLM2-135M-Instruct"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer, label


class TopLayers:
    """Runs ``model`` from the input of its top ``top`` layers."""

    def __init__(self, model: nn.Module, top: int, pad_id: int):
        self.model = model
        self.start = model.config.num_hidden_layers - top
        self.pad_id = pad_id

    def fresh(self) -> nn.Module:
        """The model to compile an adapter into (``handle.remove()`` gives it back unchanged)."""
        return self.model

    @torch.no_grad()
    def cache(self, data: dict[str, list[Encoded]]) -> None:
        """Each example's hidden state at the first adapted layer, computed without padding."""
        by_length: dict[int, list[Encoded]] = {}
        for part in data.values():
            for e in part:
                by_length.setdefault(len(e.ids), []).append(e)
        for group in by_length.values():
            for i in range(0, len(group), 64):
                chunk = group[i:i + 64]
                out = self.model.model(input_ids=torch.tensor([e.ids for e in chunk]), output_hidden_states=True)
                for e, h in zip(chunk, out.hidden_states[self.start]):
                    e.hidden = h.clone()

    @contextmanager
    def _top_only(self):
        inner = self.model.model
        layers = inner.layers
        inner.layers = nn.ModuleList(list(layers)[self.start:])
        try:
            yield
        finally:
            inner.layers = layers

    def _logits(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits (B, K, V), targets (B, K), valid (B, K), aux)``: the predictions of the last
        ``K`` tokens (the longest answer with its end token), left-padded."""
        L = max(len(e.ids) for e in batch)
        K = max(e.targets for e in batch)
        d = batch[0].hidden.shape[-1]
        hidden = torch.zeros(len(batch), L, d)
        ids = torch.full((len(batch), L), self.pad_id)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        valid = torch.zeros(len(batch), K, dtype=torch.bool)
        for i, e in enumerate(batch):
            n = len(e.ids)
            hidden[i, L - n:] = e.hidden
            ids[i, L - n:] = torch.tensor(e.ids)
            mask[i, L - n:] = 1
            valid[i, K - e.targets:] = True
        with self._top_only():
            out = self.model(inputs_embeds=hidden, attention_mask=mask, logits_to_keep=K + 1, use_cache=False)
        return out.logits[:, :K], ids[:, L - K:], valid, getattr(out, "aux_loss", None)

    def loss(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy per answer token, and the adapter's aux loss (0 without one)."""
        logits, targets, valid, aux = self._logits(batch)
        loss = F.cross_entropy(logits[valid], targets[valid])
        return loss, (aux if aux is not None else torch.zeros(()))

    @torch.no_grad()
    def score(self, examples: list[Encoded], batch: int = 32) -> dict:
        """Exact match per task (every predicted token the argmax), macro mean over tasks, and
        the mean loss per answer token."""
        hits: dict[str, list[float]] = {}
        total, tokens = 0.0, 0
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            logits, targets, valid, _ = self._logits(chunk)
            total += float(F.cross_entropy(logits[valid], targets[valid], reduction="sum"))
            tokens += int(valid.sum())
            right = ((logits.argmax(-1) == targets) | ~valid).all(-1)
            for e, ok in zip(chunk, right.tolist()):
                hits.setdefault(e.task, []).append(float(ok))
        exact = {t: sum(v) / len(v) for t, v in hits.items()}
        return {"exact": exact, "overall": sum(exact.values()) / len(exact), "loss": total / max(1, tokens)}
