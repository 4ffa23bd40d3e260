"""``share_frozen_projections``: FFN-block experts read the frozen gate/up projections computed
once for all tokens (MixLoRA's own trick), an identity of the interpreter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ffn_block_helpers import REWRITES, block_graphs, check_block_rewrite


@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_rewrite_keeps_outputs_and_gradients(graph, seed, T):
    check_block_rewrite(REWRITES["share_frozen_projections"], graph, seed, T)
