"""JSON Lines records -> token ids and labels: which positions learn, padding, and errors
that name the line."""

from __future__ import annotations

import json

import pytest

from moleforge.data import IGNORE, DataError, Example, collate, encode, encode_all, read_jsonl, record_kind
from moleforge.demo.tasks import make_tokenizer

TOK = make_tokenizer()


def ids(text: str) -> list[int]:
    return TOK.convert_tokens_to_ids(text.split())


def test_prompt_completion_learns_the_completion_and_eos_only():
    e = encode({"prompt": "+2 7", "completion": " 9 1 3 5", "task": "+2"}, TOK, 64)
    bos, eos = TOK.bos_token_id, TOK.eos_token_id
    assert e.input_ids == [bos] + ids("+2 7 9 1 3 5") + [eos]
    assert e.labels == [IGNORE] * 3 + ids("9 1 3 5") + [eos]


def test_text_learns_every_token_and_ids_pass_through():
    e = encode({"text": "+1 3 4"}, TOK, 64)
    assert e.input_ids == e.labels == [TOK.bos_token_id] + ids("+1 3 4") + [TOK.eos_token_id]
    assert encode({"input_ids": [5, 6, 7]}, None, 2) == Example([5, 6], [5, 6])


def test_records_cut_to_nothing_learnable_are_dropped_and_all_dropped_is_an_error():
    long_prompt = {"prompt": "+1 1 2 3 4 5 6", "completion": " 7"}
    short = {"prompt": "+1", "completion": " 2"}
    kept = encode_all([long_prompt, short], TOK, 5)
    assert kept == [encode(short, TOK, 5)]
    with pytest.raises(DataError, match="raise --max-length"):
        encode_all([long_prompt], TOK, 5)


def test_collate_pads_right_without_loss_on_padding():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


@pytest.mark.parametrize("rec, kind", [
    ({"text": "a"}, "text"), ({"prompt": "a", "completion": "b", "id": 3}, "prompt_completion"),
    ({"input_ids": [1]}, "input_ids"),
])
def test_record_kinds(rec, kind):
    assert record_kind(rec) == kind


@pytest.mark.parametrize("rec, message", [
    ({"text": "a", "prompt": "b"}, "match no record shape"),
    ({"completion": "b"}, "match no record shape"),
    ({"prompt": "a", "completion": ""}, "'completion' is empty"),
    ({"text": 3}, "'text' must be a string"),
    ({"input_ids": [1, -2]}, "non-negative integers"),
    ({"input_ids": [1, True, 3]}, r"input_ids\[1\] is true"),
    ({"input_ids": [False]}, r"input_ids\[0\] is false"),
    ({"input_ids": [1, 2.0]}, r"input_ids\[1\] is 2.0"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_are_refused(rec, message):
    with pytest.raises(DataError, match=message):
        record_kind(rec)


def test_read_jsonl_names_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"text": "a"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: byte 0xe9 at column 14 is not UTF-8"):
        read_jsonl(path)


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n\n" + "{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"prompt": "b", "completion": "c"}) + "\n")
    assert [record_kind(r) for r in read_jsonl(path)] == ["text", "prompt_completion"]
