"""Fuzzing the whole path from a spec to training: arbitrary specs and every preset mutated
(fields changed to random values of any type, deleted, added, lists emptied or grown, numbers
out of range) either raise ``mf.SpecError`` when validated, or compile on a tiny Llama (or are
refused by the size limits with ``mf.InjectionError``) and train two steps to a finite loss.
Nothing else: no other exception, no hang, no NaN. Each case runs under a time limit, with the
per-site size limit lowered (``MOLEFORGE_MAX_SITE_PARAMS``) so that no case allocates much."""

from __future__ import annotations

import copy
import os
import signal
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moleforge as mf
from models import VOCAB, tiny
from moleforge.backends.runtime.policy import KernelPolicy
from strategies import adapters

PRESETS = mf.presets.names()
SECONDS_PER_CASE = 20
MAX_SITE_PARAMS = 2**18
POLICY = KernelPolicy(triton="off", cpu="off")
"""Torch ops only: building the CPU kernel of routed FFN blocks takes half a minute."""

# ---- mutations --------------------------------------------------------------------------------

KEYS = ["kind", "rank", "experts", "k", "fanout", "levels", "router", "alpha", "weight", "aux_losses", "roles",
        "layers", "depth", "overrides", "scope", "gate", "down_dim", "key_dim", "block", "temperature", "jitter",
        "delta", "groups", "density", "std", "seed", "bias_update_rate", "x"]

ANY_VALUE = st.one_of(
    st.integers(-3, 12), st.sampled_from([0, -1, 2**31, 2**63, 10**6, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.5, 0.999, 1.0, 1e-30, 1e30]),
    st.sampled_from(["", "q", "gate", "topk", "dense", "switch", "noisy_topk", "pool", "residual_tree", "lora",
                     "ffn_block", "linear", "official", ".*", "(", "per_expert", "shared", "sparse_random"]),
    st.text(max_size=5), st.none(), st.booleans(),
    st.lists(st.integers(-2, 9), max_size=3), st.just({}), st.just([]),
    st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down", "bad"]), max_size=4),
    st.fixed_dictionaries({"kind": st.sampled_from(["topk", "dense", "switch_lb", "lora", "pool", "shared"])}),
)


EXTREME = st.sampled_from([0, -1, 1, 2**31, 2**62, 10**9, 0.0, 1e-45, 1e-30, 1e-8, 0.999999, 1.0 + 1e-9, 1e4, 1e8,
                           1e30, 3e38, 1e300, float("nan"), float("inf"), -float("inf")])
"""Numbers at and beyond the edges of every numeric field's range."""


def _paths(node, prefix=()):
    """Every path into a JSON-like value (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with one to three random mutations."""
    spec = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(spec))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "grow", "empty", "scale", "extreme",
                                   "extreme"]))
        target = _get(spec, path)
        if op == "set" and path:
            _get(spec, path[:-1])[path[-1]] = draw(ANY_VALUE)
        elif op == "delete" and path:
            parent = _get(spec, path[:-1])
            del parent[path[-1]]
        elif op == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(KEYS))] = draw(ANY_VALUE)
        elif op == "grow" and isinstance(target, list) and target:
            target.extend(copy.deepcopy(target[: draw(st.integers(1, 3))]) * draw(st.integers(1, 4)))
        elif op == "empty" and isinstance(target, (list, dict)):
            target.clear()
        elif op == "extreme":
            numbers = [p for p in paths if p and isinstance(_get(spec, p), (int, float))
                       and not isinstance(_get(spec, p), bool)]
            if numbers:
                where = draw(st.sampled_from(numbers))
                _get(spec, where[:-1])[where[-1]] = draw(EXTREME)
        elif op == "scale" and path and isinstance(target, (int, float)) and not isinstance(target, bool):
            factor = draw(st.sampled_from([0, -1, 2, 16, 1000, 0.5]))
            _get(spec, path[:-1])[path[-1]] = target * factor
    return spec


def _preset_json(name: str) -> dict:
    return mf.presets.load(name).model_dump(mode="json")


@st.composite
def arbitrary(draw) -> dict:
    """A spec drawn by the IR strategies (pools, rank partitions, trees, LoRA), on random roles."""
    adapter = draw(adapters())
    roles = draw(st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down"]), min_size=1, max_size=3,
                          unique=True))
    return {"sites": [{"target": {"roles": roles}, "adapter": adapter.model_dump(mode="json")}],
            "aux_loss_coef": draw(st.sampled_from([0.0, 1.0, 3.0]))}


SPECS = st.one_of(
    st.sampled_from(PRESETS).flatmap(lambda n: mutated(_preset_json(n))),
    arbitrary(),
    arbitrary().flatmap(mutated),
)

# ---- one case ---------------------------------------------------------------------------------


@contextmanager
def _time_limit(seconds: int):
    def fail(*_):
        raise TimeoutError(f"one case ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_spec(data) -> str:
    """The outcome of one spec (``"spec error"``, ``"refused"`` by ``compile``: too large, or no
    module matches, or ``"trained"``); raises on anything else."""
    try:
        spec = mf.AdapterSpec.model_validate(data)
    except mf.SpecError:
        return "spec error"
    model = tiny("llama", layers=1).train()
    try:
        handle = mf.compile(spec, model, policy=POLICY)
    except mf.InjectionError:
        assert not any(type(m).__name__.startswith("Moleforge") or hasattr(m, "site") for m in model.modules()), \
            "a refused spec leaves the model as it was"
        return "refused"
    params = list(handle.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    handle.seed_noise(0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with handle.sample_types(torch.tensor([0, 1])):
            out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss), f"loss {out.loss} for {spec.model_dump_json()}"
        if opt is not None:
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        handle.update_balancing()
    return "trained"


@settings(max_examples=int(os.environ.get("MOLEFORGE_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=SPECS)
def test_mutated_and_arbitrary_specs_fail_cleanly_or_train(data):
    with pytest.MonkeyPatch.context() as mp, _time_limit(SECONDS_PER_CASE):
        mp.setenv("MOLEFORGE_MAX_SITE_PARAMS", str(MAX_SITE_PARAMS))
        check_spec(data)


def test_the_fuzzer_reaches_every_outcome():
    """The mutations are not all rejected: presets train, broken ones are spec errors, huge ones are
    refused by the size limit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLEFORGE_MAX_SITE_PARAMS", str(MAX_SITE_PARAMS))
        assert check_spec(_preset_json("smore")) == "trained"
        broken = _preset_json("molora")
        broken["sites"][0]["adapter"]["experts"] = -1
        assert check_spec(broken) == "spec error"
        huge = _preset_json("molora")
        huge["sites"][0]["adapter"]["experts"] = 10**6
        assert check_spec(huge) == "refused"


# ---- what the fuzzer found --------------------------------------------------------------------

def _set(spec: dict, path: str, value) -> dict:
    """``spec`` with the dotted ``path`` (list indices as numbers) set to ``value``."""
    *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = spec
    for p in head:
        node = node[p]
    node[last] = value
    return spec


FOUND_NAN = [
    ("molora", "sites.0.adapter.alpha", 1e30, 1e4),
    ("molora", "sites.0.adapter.aux_losses.0.weight", 1e300, 1e3),
    ("loramoe", "sites.0.adapter.aux_losses.0.weight", 1e30, 1e3),
    ("molora", "aux_loss_coef", 1e300, 1e3),
    ("smora", "sites.0.adapter.router.bias_update_rate", 1e300, 1.0),
    ("flylora", "sites.0.adapter.router.bias_update_rate", 1e300, 1.0),
    ("lora", "sites.0.init", {"up": "normal", "std": 2.0**31}, {"up": "normal", "std": 10.0}),
    ("molora", "sites.0.adapter.router.temperature", 1e-40, 1e-3),
    ("smore", "sites.0.adapter.router.temperature", 1e-40, 1e-3),
    ("smore", "sites.0.adapter.levels.0.alpha", 1e30, 1e4),
]
"""Finite numbers the spec took that trained to inf or NaN within two steps: ``(preset, field,
value found, the largest (smallest) value the field now takes)``."""


@pytest.mark.parametrize("preset, path, bad, edge", FOUND_NAN, ids=[f"{p}-{f}" for p, f, *_ in FOUND_NAN])
def test_numbers_that_trained_to_nan_are_spec_errors_and_the_edge_trains(preset, path, bad, edge):
    with pytest.raises(mf.SpecError) as info:
        mf.AdapterSpec.model_validate(_set(_preset_json(preset), path, bad))
    field = path.split(".")[-1] if not isinstance(bad, dict) else "std"
    assert field in str(info.value)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLEFORGE_MAX_SITE_PARAMS", str(MAX_SITE_PARAMS))
        edge_spec = _set(_preset_json(preset), path, edge)
        if "levels" in path or "alpha" in path or "init" in path:  # the scale multiplies trained values
            edge_spec = mf.AdapterSpec.model_validate(edge_spec).with_init(mf.Init(up="normal", std=10.0))
            edge_spec = edge_spec.model_dump(mode="json")
        assert check_spec(edge_spec) == "trained"


def test_seed_noise_of_an_adapter_without_parameters():
    """Frozen FlyLoRA experts: the site holds buffers only (``seed_noise`` looked for a parameter)."""
    spec = {"sites": [{"target": {"roles": ["o"]}, "adapter": {
        "kind": "pool", "experts": 2, "rank": 1, "alpha": 2.0, "scaling": "alpha_over_total_rank",
        "down": {"kind": "sparse_random", "density": 0.5}, "router": {"kind": "implicit_topk", "k": 2},
        "frozen_experts": True}}]}
    assert check_spec(spec) == "trained"


def test_a_tree_routing_millions_of_nodes_per_token_is_refused_before_allocating(monkeypatch):
    """24 levels of fanout 2: few parameters, 2**25 - 2 nodes per token."""
    spec = _set(_preset_json("smore"), "sites.0.adapter.levels", [{"experts": 2, "rank": 1, "fanout": 2}] * 24)
    model = tiny("llama", layers=1)
    with pytest.raises(mf.InjectionError, match=r"routes 33,554,430 tree nodes per token.*limit of 4,096"):
        mf.compile(spec, model)
    assert not any(hasattr(m, "site") for m in model.modules()), "the model is left as it was"
    twelve = _set(_preset_json("smore"), "sites.0.adapter.levels", [{"experts": 2, "rank": 1, "fanout": 2}] * 12)
    with pytest.raises(mf.InjectionError, match="8,190 tree nodes"):
        mf.compile(twelve, tiny("llama", layers=1))
    monkeypatch.setenv("MOLEFORGE_MAX_TREE_NODES", "1e4")
    assert check_spec(twelve) == "trained"
    monkeypatch.setenv("MOLEFORGE_MAX_TREE_NODES", "many")
    with pytest.raises(mf.InjectionError, match="MOLEFORGE_MAX_TREE_NODES='many' is not a number of tree nodes"):
        mf.compile(twelve, tiny("llama", layers=1))
