"""common/data.py: readers, formats, validation errors, tokenization with prompt masking."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedtune.common.config import DataConfig
from fedtune.common.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    RecordError,
    collate,
    detect_format,
    load_site_data,
    normalize_record,
    split_examples,
    tokenize_all,
    tokenize_example,
)

SECRET = "SECRET-7f3a-PATIENT-JANE-DOE"

# ------------------------------------------------------------------ sample records per format

RECORDS = {
    "alpaca": [
        {"instruction": "Name the colour of the sky.", "output": "blue"},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome"}]},
    ],
    "prompt_completion": [
        {"prompt": "Say yes.", "completion": "yes"},
        {"prompt": "Say no.", "completion": "no"},
    ],
    "text": [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}],
}

EXPECTED = {
    "alpaca": [
        Example(
            messages=[
                {"role": "user", "content": "Name the colour of the sky."},
                {"role": "assistant", "content": "blue"},
            ]
        ),
        Example(
            messages=[
                {"role": "user", "content": "Translate to French.\n\ncat"},
                {"role": "assistant", "content": "chat"},
            ]
        ),
    ],
    "messages": [
        Example(messages=RECORDS["messages"][0]["messages"]),
        Example(messages=RECORDS["messages"][1]["messages"]),
    ],
    "prompt_completion": [
        Example(messages=[{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]),
        Example(messages=[{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "no"}]),
    ],
    "text": [Example(text="The quick brown fox."), Example(text="Jumps over the lazy dog.")],
}


def write_jsonl(path: Path, recs: list) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def write_json_list(path: Path, recs: list) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(recs, indent=1), encoding="utf-8")
    return path


def write_json_data(path: Path, recs: list) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps({"data": recs}), encoding="utf-8")
    return path


def _flat(recs: list) -> list[dict]:
    # CSV cells hold the messages list as JSON text.
    return [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in recs]


def write_csv(path: Path, recs: list) -> Path:
    path = path.with_suffix(".csv")
    rows = _flat(recs)
    fields = sorted({k for r in rows for k in r})
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, recs: list) -> Path:
    path = path.with_suffix(".parquet")
    pd.DataFrame(recs).to_parquet(path, index=False)
    return path


WRITERS = {
    "jsonl": write_jsonl,
    "json_list": write_json_list,
    "json_data": write_json_data,
    "csv": write_csv,
    "parquet": write_parquet,
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_format_from_every_reader(tmp_path, writer, fmt):
    path = WRITERS[writer](tmp_path / "site", RECORDS[fmt])
    data = load_site_data(path, DataConfig())
    assert data.format == fmt
    assert data.records_read == 2 and data.n_invalid == 0
    assert data.examples == EXPECTED[fmt]


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_explicit_format(tmp_path, fmt):
    data = load_site_data(write_jsonl(tmp_path / "s", RECORDS[fmt]), DataConfig(format=fmt))
    assert data.format == fmt and data.examples == EXPECTED[fmt]


def test_explicit_format_overrides_detection(tmp_path):
    # Has both prompt/completion and text: auto picks prompt_completion, text when asked.
    recs = [{"prompt": "p", "completion": "c", "text": "whole"}]
    path = write_jsonl(tmp_path / "s", recs)
    assert load_site_data(path, DataConfig()).examples[0].messages[1]["content"] == "c"
    assert load_site_data(path, DataConfig(format="text")).examples == [Example(text="whole")]


def test_explicit_format_mismatch_fails(tmp_path):
    path = write_jsonl(tmp_path / "s", RECORDS["messages"])
    with pytest.raises(DataError, match="missing field 'instruction'"):
        load_site_data(path, DataConfig(format="alpaca"))


def test_json_file_holding_jsonl_is_read(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS["alpaca"]), encoding="utf-8")
    assert load_site_data(path, DataConfig()).examples == EXPECTED["alpaca"]


def test_bom_and_blank_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(
        "\ufeff" + json.dumps(RECORDS["text"][0]) + "\n\n  \n" + json.dumps(RECORDS["text"][1]) + "\n", encoding="utf-8"
    )
    data = load_site_data(path, DataConfig())
    assert data.records_read == 2 and data.examples == EXPECTED["text"]


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "x", "output": "b"}, "alpaca"),
        ({"messages": []}, "messages"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize("record", [{"question": "q", "answer": "a"}, ["a", "b"], "text"])
def test_detect_format_fails(record):
    with pytest.raises(RecordError):
        detect_format(record)


def test_numbers_are_text():
    ex = normalize_record({"prompt": 12, "completion": 3.5}, "prompt_completion")
    assert ex.messages[0]["content"] == "12" and ex.messages[1]["content"] == "3.5"


@pytest.mark.parametrize(
    "record, fmt, why",
    [
        ({"instruction": "a"}, "alpaca", "missing field 'output'"),
        ({"instruction": "a", "output": "  "}, "alpaca", "field 'output' is empty"),
        ({"instruction": "a", "output": ["x"]}, "alpaca", "field 'output' must be text"),
        ({"instruction": "a", "output": True}, "alpaca", "field 'output' must be text"),
        ({"messages": "not json"}, "messages", "not a JSON list"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", r"messages\[0\].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", r"messages\[0\].content"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no non-empty assistant turn"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "messages",
            "no non-empty assistant",
        ),
        ({"prompt": "a"}, "prompt_completion", "missing field 'completion'"),
        ({"text": ""}, "text", "field 'text' is empty"),
    ],
)
def test_record_errors(record, fmt, why):
    with pytest.raises(RecordError, match=why):
        normalize_record(record, fmt)


# ------------------------------------------------------------------ file errors: name the file and the line


def test_malformed_json_line(tmp_path):
    path = tmp_path / "s.jsonl"
    good = json.dumps(RECORDS["alpaca"][0])
    path.write_text(f'{good}\n{good}\n{{"instruction": "{SECRET}", \n', encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    msg = str(ei.value)
    assert str(path) in msg and "line 3: malformed JSON" in msg
    assert "1 of 3 records" in msg
    assert SECRET not in msg


def test_malformed_json_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b" "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert str(path) in str(ei.value) and "line 3: malformed JSON" in str(ei.value)


def test_missing_field_names_line_and_field(tmp_path):
    recs = [RECORDS["alpaca"][0], {"instruction": SECRET}]
    path = write_jsonl(tmp_path / "s", recs)
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    msg = str(ei.value)
    assert str(path) in msg and "line 2: missing field 'output'" in msg
    assert SECRET not in msg


def test_missing_field_in_json_names_record_index(tmp_path):
    path = write_json_list(tmp_path / "s", [RECORDS["alpaca"][0], RECORDS["alpaca"][1], {"instruction": "x"}])
    with pytest.raises(DataError, match=r"record 2: missing field 'output'"):
        load_site_data(path, DataConfig())


def test_missing_field_in_csv_names_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("instruction,output\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.csv: .*line 3: missing field 'output'"):
        load_site_data(path, DataConfig())


def test_missing_field_in_parquet_names_row(tmp_path):
    path = write_parquet(tmp_path / "s", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    with pytest.raises(DataError, match=r"row 1: missing field 'completion'"):
        load_site_data(path, DataConfig())


def test_csv_extra_fields(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(f"text\nfine\ntoo,many,{SECRET}\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert "line 3: 2 more field(s)" in str(ei.value)
    assert SECRET not in str(ei.value)


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        json.dumps(RECORDS["text"][0]).encode() + b"\n" + b'{"text": "caf\xe9 ' + SECRET.encode() + b'"}\n'
    )
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    msg = str(ei.value)
    assert str(path) in msg and "line 2: not valid UTF-8" in msg
    assert SECRET not in msg


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"text\nok\nbad \xff\n")
    with pytest.raises(DataError, match=r"s\.csv: line 3: not valid UTF-8"):
        load_site_data(path, DataConfig())


def test_non_utf8_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes(b'[{"text": "\xff"}]')
    with pytest.raises(DataError, match=r"s\.json: line 1: not valid UTF-8 \(byte 11\)"):
        load_site_data(path, DataConfig())


def test_empty_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"s\.jsonl: empty file"):
        load_site_data(path, DataConfig())


def test_blank_only_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl: no records"):
        load_site_data(path, DataConfig())


def test_unknown_extension(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert str(path) in str(ei.value) and "unknown data file type '.txt'" in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_site_data(tmp_path / "nope.jsonl", DataConfig())


def test_bad_parquet(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"s\.parquet: not a readable Parquet file"):
        load_site_data(path, DataConfig())


@pytest.mark.parametrize(
    "bad",
    [
        {"instruction": SECRET},  # missing output
        {"instruction": "x", "output": [SECRET]},  # wrong type
        {"instruction": "x", "output": {"k": SECRET}},
        {"messages": [{"role": SECRET, "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": f"[{SECRET}"},  # JSON text that is not JSON
        {"messages": [{"role": "user", "content": SECRET}]},  # no assistant turn
        SECRET,  # not an object
    ],
)
def test_error_never_quotes_record_content(tmp_path, bad):
    path = write_jsonl(
        tmp_path / "s",
        [RECORDS["alpaca"][0] if not isinstance(bad, dict) or "messages" not in bad else RECORDS["messages"][1], bad],
    )
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert "line 2" in str(ei.value)
    assert SECRET not in str(ei.value)


def test_headerless_csv_does_not_leak_first_record(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(f"What is the code of {SECRET}?,4711\nAnother question,42\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert SECRET not in str(ei.value)


# ------------------------------------------------------------------ tolerance


def _ten_with_bad(tmp_path, n_bad: int) -> Path:
    recs: list = [{"text": f"record {i}"} for i in range(10 - n_bad)]
    recs += [{"text": ""} for _ in range(n_bad)]
    return write_jsonl(tmp_path / "s", recs)


def test_tolerance_skips_and_counts(tmp_path):
    data = load_site_data(_ten_with_bad(tmp_path, 1), DataConfig(max_invalid_fraction=0.1))
    assert data.records_read == 10
    assert data.n_invalid == 1 and len(data.examples) == 9
    assert data.invalid == [("line 10", "field 'text' is empty")]


def test_tolerance_exceeded(tmp_path):
    with pytest.raises(DataError) as ei:
        load_site_data(_ten_with_bad(tmp_path, 2), DataConfig(max_invalid_fraction=0.1))
    msg = str(ei.value)
    assert "2 of 10 records unusable" in msg and "--max-invalid-fraction 0.1 (data.max_invalid_fraction)" in msg
    assert "skip them with --max-invalid-fraction 0.2 or more" in msg
    assert "line 9" in msg and "line 10" in msg


def test_zero_tolerance_refuses_one_bad(tmp_path):
    with pytest.raises(DataError, match="1 of 10"):
        load_site_data(_ten_with_bad(tmp_path, 1), DataConfig())


def test_error_lists_at_most_five(tmp_path):
    path = write_jsonl(tmp_path / "s", [{"text": ""}] * 8)
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert "(and 3 more)" in str(ei.value) and "line 6" not in str(ei.value)


def test_first_bad_record_does_not_fix_format(tmp_path):
    path = write_jsonl(tmp_path / "s", [{"bogus": 1}] + RECORDS["prompt_completion"] * 5)
    data = load_site_data(path, DataConfig(max_invalid_fraction=0.2))
    assert data.format == "prompt_completion" and len(data.examples) == 10 and data.n_invalid == 1


# ------------------------------------------------------------------ tokenization


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_template_renders_as_expected(tiny_tokenizer):
    # The hand-written expectations below assume this exact ChatML rendering.
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert (
        tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
        == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert len(ids(tiny_tokenizer, "<|im_end|>")) == 1


def test_single_turn_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = Example(
        messages=[{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "blue"}]
    )
    out = tokenize_example(ex, tok, max_length=512)
    prompt = ids(tok, "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tok, "blue<|im_end|>\n")
    assert out["input_ids"] == prompt + answer
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.eos_token_id in [t for t in out["labels"] if t != IGNORE_INDEX]
    assert tok.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == "blue<|im_end|>\n"


def test_multi_turn_with_system_labels_each_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = EXPECTED["messages"][0]  # system, user, assistant, user, assistant
    out = tokenize_example(ex, tok, max_length=512)
    p1 = ids(
        tok, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    a1 = ids(tok, "Hello<|im_end|>\n")
    p2 = ids(tok, "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    a2 = ids(tok, "4<|im_end|>\n")
    assert out["input_ids"] == p1 + a1 + p2 + a2
    m = [IGNORE_INDEX]
    assert out["labels"] == m * len(p1) + a1 + m * len(p2) + a2
    assert sum(t == tok.eos_token_id for t in out["labels"]) == 2


def test_system_prompt_added_only_when_missing(tiny_tokenizer):
    tok = tiny_tokenizer
    plain = Example(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    out = tokenize_example(plain, tok, 512, system_prompt="Be nice.")
    prompt = ids(tok, "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert out["input_ids"][: len(prompt)] == prompt
    own = tokenize_example(EXPECTED["messages"][0], tok, 512, system_prompt="Be nice.")
    assert own == tokenize_example(EXPECTED["messages"][0], tok, 512)


def test_text_labels_every_token(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_example(Example(text="The quick brown fox."), tok, 512)
    expected = ids(tok, "The quick brown fox.<|im_end|>")
    assert out["input_ids"] == expected and out["labels"] == expected
    assert out["input_ids"][-1] == tok.eos_token_id


def test_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    full = tokenize_example(Example(text="word " * 100), tok, 10_000)
    assert len(full["input_ids"]) > 20
    cut = tokenize_example(Example(text="word " * 100), tok, 20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_answer_truncated_away_is_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = Example(
        messages=[
            {"role": "user", "content": "A rather long question about the weather today?"},
            {"role": "assistant", "content": "sunny"},
        ]
    )
    n_prompt = len(
        ids(tok, "<|im_start|>user\nA rather long question about the weather today?<|im_end|>\n<|im_start|>assistant\n")
    )
    # Exactly at the prompt's length: no answer token survives.
    assert tokenize_example(ex, tok, n_prompt) is None
    # One more token: the first answer token survives and is labelled.
    kept = tokenize_example(ex, tok, n_prompt + 1)
    assert kept is not None and len(kept["input_ids"]) == n_prompt + 1
    assert kept["labels"][-1] == kept["input_ids"][-1] != IGNORE_INDEX
    short = Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}])
    res = tokenize_all([ex, short, ex], tok, DataConfig(max_length=n_prompt))
    assert res.dropped_too_long == 2 and len(res) == 1
    assert res.items[0] == tokenize_example(short, tok, n_prompt)


def test_bundled_data_tokenizes(tiny_tokenizer):
    data = load_site_data(Path(__file__).resolve().parents[2] / "simulations/data/legal/train.jsonl", DataConfig())
    res = tokenize_all(data.examples, tiny_tokenizer, DataConfig(max_length=256))
    assert len(res) == data.records_read and res.dropped_too_long == 0
    for it in res.items:
        assert len(it["input_ids"]) == len(it["labels"]) <= 256
        assert it["labels"][0] == IGNORE_INDEX  # the prompt opens every example
        assert it["labels"][-2] == tiny_tokenizer.eos_token_id  # ... and each ends with <|im_end|>\n


def test_collate_pads():
    items = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
    ]
    b = collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in b.values())


# ------------------------------------------------------------------ splitting


def test_split_examples_seeded_and_disjoint():
    exs = [Example(text=str(i)) for i in range(50)]
    tr, ev = split_examples(exs, 0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40
    assert {e.text for e in tr}.isdisjoint({e.text for e in ev})
    assert sorted(int(e.text) for e in tr + ev) == list(range(50))
    assert split_examples(exs, 0.2, seed=3) == (tr, ev)
    assert split_examples(exs, 0.2, seed=4)[1] != ev
    # Order is kept within each part.
    assert [int(e.text) for e in tr] == sorted(int(e.text) for e in tr)


def test_split_edge_cases():
    exs = [Example(text=str(i)) for i in range(3)]
    assert split_examples(exs, 0.0, 0) == (exs, [])
    assert split_examples(exs[:1], 0.5, 0) == (exs[:1], [])
    tr, ev = split_examples(exs, 0.01, 0)
    assert len(ev) == 1 and len(tr) == 2  # at least one held out
    tr, ev = split_examples(exs[:2], 0.9, 0)
    assert len(tr) == 1 and len(ev) == 1  # at least one kept for training
