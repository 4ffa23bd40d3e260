"""The one tolerance table. Tests take tolerances from here only; a new entry needs a reason."""

from __future__ import annotations

import torch

# The one tolerance table: (atol, rtol, reason). Tests take tolerances from here only.
TOLERANCES: dict[str, tuple[float, float, str]] = {
    "float64": (1e-10, 1e-9, "same math in float64; only summation order differs"),
    "float32": (2e-5, 1e-4, "float32 accumulation over d_in <= 512 terms"),
    "float32_model": (2e-5, 1e-4, "whole tiny HF model in float32"),
    "save_load": (1e-6, 0.0, "save -> load must reproduce logits (api contract bound)"),
    "mixlora_package": (1e-5, 0.0, "logits of an imported MixLoRA adapter against the mixlora package, float32"),
    "float16_kernel": (1e-2, 1e-2, "a Triton kernel on float16 tensors (float32 accumulation) against float64 on the "
                                   "same rounded inputs, scaled to the largest value: a few roundings of 2^-11"),
    "float32_cpu_kernel": (1e-4, 1e-4, "the compiled CPU kernel on float32 tensors against the torch ops in float32, "
                                       "scaled to the largest value: two float32 summation orders"),
    "bfloat16_kernel": (6e-2, 6e-2, "a Triton kernel on bfloat16 tensors against float64 on the same rounded inputs, "
                                    "scaled to the largest value: roundings of 2^-8 through up to three tree levels"),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "float64", msg: str = "") -> None:
    atol, rtol, _ = TOLERANCES[kind]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=msg or None)


