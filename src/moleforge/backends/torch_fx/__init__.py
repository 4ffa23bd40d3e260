"""The torch backend: IR -> torch.fx GraphModules, injected into HF models.

``torch.compile`` of an adapted model
-------------------------------------
The generated site modules are plain tensor code with static shapes wherever the spec allows
it, so ``torch.compile(model, fullgraph=True)`` traces the whole forward, adapters included,
as one graph and gives the eager outputs and gradients. Guaranteed (tested, training mode,
forward and backward):

- ``lora`` sites (any scaling);
- ``pool`` / ``rank_partition`` sites whose router is ``dense`` or ``static``, with per-expert or
  shared factors, a shared expert, frozen experts, and no aux loss or ``cv2_importance_load``;
- the block-gated and outer-gated forms of pools (``BlockGate``, ``OuterGate``);
- ``residual_tree`` sites with the ``dense`` gate;
- on CPU float32/float64 with the compiled CPU kernel, grouped pools (``GroupedMix``) under a
  top-k router, their router and softmax top-k gate included (MoLoRA's sites: the kernel's
  outputs have fixed shapes).

Top-k routers (``topk``, ``sigmoid_topk``, ``implicit_topk``, switch / noisy tree gates) and
``switch_lb`` also trace as one graph with current PyTorch, but their selection counts
(``bincount``) have data-dependent sizes, which makes compilation slow and is not guaranteed.
Data-dependent code is allowed to break the graph, and does: the grouped per-expert form on the
torch ops (``GroupedMix``: each expert runs on the tokens that chose it) and ``localized_balance`` (its
number of samples is read from the data). Dynamo then splits the graph there and the result
is still the eager one.

The model's forward hooks (aux-loss collection) are traced as their own small frames.
A padded batch (``attention_mask`` with zeros) keeps one graph: the aux losses and selection
counts then weight the tokens by the mask with fixed shapes. Eagerly, an all-ones mask is
treated as no mask (the exact unmasked computation); under ``torch.compile`` that check, a
data-dependent branch, is skipped and such a mask takes the masked path (equal up to rounding).
"""
