"""``torch.compile`` of the decode step: the whole model's forward, compiled with ``fullgraph=True``
(no graph break anywhere, moleforge's sites included), generates with a static KV cache the
tokens and logits of the eager model."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import moleforge as mf
from models import VOCAB, tiny
from tolerances import assert_close


@pytest.mark.parametrize("preset", ["molora", "smore", "mixlora"])
def test_compiled_decode_step_has_no_graph_break_and_generates_the_eager_tokens(preset):
    model = tiny("llama", layers=1)
    mf.compile(mf.presets.load(preset).with_init(mf.Init(up="normal", std=0.3, seed=1)), model)
    model.eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        dynamo.reset()
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        compiled = model.generate(ids, cache_implementation="static", **kw)
    del model.forward
    assert torch.equal(compiled.sequences, eager.sequences)
    assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), "float32_model")
    assert torch.stack(eager.logits).std() > 1e-3
