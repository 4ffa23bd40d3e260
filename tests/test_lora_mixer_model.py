"""The ``lora_mixer`` preset in a model: every expert on in training, the top 3 at inference."""

from __future__ import annotations

import torch

import moleforge as mf
from models import batch, tiny


def _active(model, handle, training: bool) -> set[int]:
    with handle.record_routing() as log:
        model.train(training)(batch())
    return {int(c) for _, routes in log.entries for c in (routes["route"].gates > 0).sum(1)}


def test_dense_in_training_top_three_at_inference():
    model = tiny("llama")
    handle = mf.compile("lora_mixer", model)
    assert _active(model, handle, training=True) == {8}
    assert _active(model, handle, training=False) == {3}
    with torch.no_grad():
        out = model.train()(batch(), labels=batch())
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
