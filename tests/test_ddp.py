"""Routed adapters under ``DistributedDataParallel``: two CPU processes (gloo), with
``find_unused_parameters=True``, which rebuilds the model output from its pytree."""

from __future__ import annotations

import json

import torch.multiprocessing as mp
from transformers.modeling_outputs import CausalLMOutputWithPast

from ddp_helpers import ddp_worker


def test_routed_adapter_trains_under_ddp_with_unused_parameter_search(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for run in runs:
        assert run["finite"], run
        assert run["output"].startswith("CausalLMOutputWithPast")
    assert runs[0]["losses"] != runs[1]["losses"], "each rank trains on its own batch"
    assert runs[0]["grads"] and runs[0]["grads"] == runs[1]["grads"], "DDP averages the gradients over the ranks"


def test_the_aux_loss_output_is_a_subclass_that_declares_the_field():
    """What DDP does to the output: ``tree_flatten`` then ``tree_unflatten``, which calls the
    output class with every key."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    import moleforge as mf
    from models import batch, tiny

    model = tiny("llama")
    mf.compile("molora", model)
    out = model(input_ids=batch(), labels=batch())
    assert isinstance(out, CausalLMOutputWithPast)
    leaves, spec = tree_flatten(out)
    again = tree_unflatten(leaves, spec)
    assert torch.equal(again.aux_loss, out.aux_loss) and torch.equal(again.loss, out.loss)
