"""On a CUDA device an adapted tiny Llama computes what it computes on the CPU: logits, loss (with
the aux losses) and the adapter's gradients. Skipped without CUDA (the ``gpu`` marker)."""

from __future__ import annotations

import pytest

import moleforge as mf
from models import batch, tiny
from tolerances import assert_close


def _adapted(spec: dict, device: str):
    model = tiny("llama").to(device)
    handle = mf.compile(spec, model)
    ids = batch().to(device)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in handle.named_parameters()}
    return out.logits.detach().cpu(), out.loss.detach().cpu(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["smore", "molora"])
def test_cuda_forward_and_backward_match_the_cpu(preset):
    spec = mf.presets.load(preset).model_dump()
    for site in spec["sites"]:
        site["init"] = {"up": "normal", "std": 0.05, "seed": 0}  # a non-trivial adapter, the same on both devices
    cpu, cuda = _adapted(spec, "cpu"), _adapted(spec, "cuda")
    assert_close(cuda[0], cpu[0], "float32_model", msg="logits")
    assert_close(cuda[1], cpu[1], "float32_model", msg="loss")
    assert cuda[2].keys() == cpu[2].keys() and cpu[2]
    for name, grad in cpu[2].items():
        assert_close(cuda[2][name], grad, "float32_model", msg=name)
