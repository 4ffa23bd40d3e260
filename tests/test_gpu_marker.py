"""The ``gpu`` marker (tests/conftest.py): without a CUDA device a gpu-marked test is reported as
skipped, with the reason; with one it runs. The real conftest runs in a pytester session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def marked(pytester, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the copied conftest may set it; restored after
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_marked="""
        import pytest

        @pytest.mark.gpu
        def test_on_the_gpu():
            pass

        def test_anywhere():
            pass
    """)
    return pytester


def test_a_gpu_test_is_skipped_without_cuda(marked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = marked.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*test_marked.py*needs a CUDA device*"])


def test_a_gpu_test_runs_with_cuda(marked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    marked.runpytest("--strict-markers").assert_outcomes(passed=2)
