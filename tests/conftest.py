"""Shared test configuration: hypothesis profiles, the one tolerance table, tiny models."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# The one tolerance table: (atol, rtol, reason). Tests take tolerances from here only.
TOLERANCES: dict[str, tuple[float, float, str]] = {
    "float64": (1e-10, 1e-9, "same math in float64; only summation order differs"),
    "float32": (2e-5, 1e-4, "float32 accumulation over d_in <= 512 terms"),
    "float32_model": (2e-5, 1e-4, "whole tiny HF model in float32"),
    "save_load": (1e-6, 0.0, "save -> load must reproduce logits (api contract bound)"),
    "mixlora_package": (1e-5, 0.0, "logits of an imported MixLoRA adapter against the mixlora package, float32"),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "float64", msg: str = "") -> None:
    atol, rtol, _ = TOLERANCES[kind]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=msg or None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.gpu)
