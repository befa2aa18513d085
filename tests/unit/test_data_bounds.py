"""common/data.py reads any site file in bounded time and memory (issue 15).

A 50 MB single-line file, a record nested 100,000 deep and a lone surrogate each once got far
(9 GB of memory, a RecursionError traceback, a crash inside the tokenizer). Now each is refused
at its file:line (and field), within seconds and about one record's worth of memory, and the
message quotes nothing of the record."""

from __future__ import annotations

import csv
import json
import re
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.common.config import DataConfig, FedTuneConfig
from fedtune.common.data import MAX_NESTING, DataError, Example, iter_raw_records, load_site_data, tokenize_all

SECRET = "SECRET-7f3a-PATIENT-JANE-DOE"
MB = 1 << 20


def write_huge_line(
    path: Path, head: bytes, tail: bytes, mb: int = 50, before: bytes = b"", after: bytes = b""
) -> Path:
    """``before`` + head + 50 MB of SECRET-laden text + tail + ``after``, written in 1 MB pieces."""
    piece = (SECRET.encode() + b" ") * (MB // (len(SECRET) + 1))
    with path.open("wb") as f:
        f.write(before + head)
        for _ in range(mb):
            f.write(piece)
        f.write(tail + after)
    return path


def load_measured(path: Path, cfg: DataConfig) -> tuple[object, float, int]:
    """-> (the DataError or SiteData, seconds, peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = load_site_data(path, cfg)
    except DataError as e:
        out = e
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak


GOOD = json.dumps({"text": "fine"}).encode()


@pytest.mark.parametrize(
    "name, head, tail, before, expected",
    [
        (
            "s.jsonl",
            b'{"text": "',
            b'"}\n',
            GOOD + b"\n",
            r"line 2: longer than data\.max_record_bytes \(1048576 bytes\)",
        ),
        ("s.jsonl", b"", b"", b"", r"line 1: longer than data\.max_record_bytes"),  # no newline at all
        ("s.json", b'[{"text": "', b'"}]', b"", r"line 1: record 0 is longer than data\.max_record_bytes"),
        (
            "s.json",
            b'[\n{"text": "a"},\n{"text": "',
            b'"}]',
            b"",
            r"line 3: record 1 is longer than data\.max_record_bytes",
        ),
        ("s.json", b'{"text": "', b'"}', b"", r"line 1: record 0: field 'text' is longer than data\.max_record_bytes"),
        ("s.csv", b'text\n"', b'"\n', b"", r"s\.csv: line 2: (a row )?longer than data\.max_record_bytes"),
    ],
)
def test_a_50_mb_record_fails_fast_at_its_line_in_bounded_memory(tmp_path, name, head, tail, before, expected):
    path = write_huge_line(tmp_path / name, head, tail, before=before)
    err, seconds, peak = load_measured(path, DataConfig())
    path.unlink()  # 50 MB: not left in pytest's kept temp folders
    assert isinstance(err, DataError), err
    msg = str(err)
    assert str(path) in msg
    assert re.search(expected, msg), msg
    assert SECRET not in msg
    # A record's cap (1 MB) plus read buffers; the file is 50 MB. Timing is loose (slow CI machines).
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MB"
    assert seconds < 20, seconds


def test_an_overlong_jsonl_line_is_skipped_and_counted_under_the_tolerance(tmp_path):
    path = write_huge_line(
        tmp_path / "s.jsonl", b'{"text": "', b'"}\n', mb=3, before=GOOD + b"\n", after=GOOD + b"\n" + GOOD + b"\n"
    )
    data = load_site_data(path, DataConfig(max_invalid_fraction=0.5))
    assert data.records_read == 4 and data.examples == [Example(text="fine")] * 3
    assert data.invalid == [("line 2", "longer than data.max_record_bytes (1048576 bytes)")]


def test_the_cap_is_configurable(tmp_path):
    rec = {"text": "x" * 3000}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert load_site_data(path, DataConfig()).examples == [Example(text=rec["text"])]
    with pytest.raises(DataError, match=r"line 1: longer than data\.max_record_bytes \(2048 bytes\)"):
        load_site_data(path, DataConfig(max_record_bytes=2048))
    with pytest.raises(ValueError):
        DataConfig(max_record_bytes=10)  # below the floor: the schema refuses it


def test_a_csv_field_above_csvs_own_default_limit_is_read(tmp_path):
    """csv's field_size_limit defaults to 128 KB; the site's cap is what applies, and the
    process-wide csv limit is left as it was."""
    before = csv.field_size_limit()
    path = tmp_path / "s.csv"
    path.write_text("prompt,completion\n" + "q" * 300_000 + ",a\n")
    data = load_site_data(path, DataConfig())
    assert len(data.examples[0].messages[0]["content"]) == 300_000
    assert csv.field_size_limit() == before


def test_a_parquet_row_above_the_cap_is_named_by_its_row(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": ["ok", SECRET * 100, "ok"]}), path, row_group_size=1)
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig(max_record_bytes=1024))
    assert "row 1: longer than data.max_record_bytes (1024 bytes)" in str(ei.value) and SECRET not in str(ei.value)
    data = load_site_data(path, DataConfig(max_record_bytes=1024, max_invalid_fraction=0.5))
    assert data.examples == [Example(text="ok")] * 2


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(1000)]}), path, row_group_size=100)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    assert [e.text for e in load_site_data(path, DataConfig()).examples] == [f"r{i}" for i in range(1000)]


# ------------------------------------------------------------------ nesting


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 900, 100_000])
def test_deep_nesting_is_a_located_error_not_a_recursion_error(tmp_path, depth):
    deep = "[" * depth + json.dumps(SECRET) + "]" * depth
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(GOOD.decode() + "\n" + '{"text": "a", "extra": ' + deep + "}\n")
    with pytest.raises(DataError) as ei:
        load_site_data(jsonl, DataConfig())
    assert f"line 2: nested deeper than {MAX_NESTING} levels" in str(ei.value) and SECRET not in str(ei.value)

    listed = tmp_path / "s.json"
    listed.write_text('[{"text": "a"},\n {"text": "b", "extra": ' + deep + "}]")
    with pytest.raises(DataError) as ei:
        load_site_data(listed, DataConfig())
    assert "nested deeper than" in str(ei.value) and SECRET not in str(ei.value)
    assert "record 1" in str(ei.value) or "line 2" in str(ei.value)

    cell = tmp_path / "s.csv"
    with cell.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], [deep]])
    with pytest.raises(DataError) as ei:
        load_site_data(cell, DataConfig())
    assert "line 2: field 'messages': nested deeper than" in str(ei.value) and SECRET not in str(ei.value)


def test_records_at_the_nesting_cap_are_fine(tmp_path):
    # messages (1) -> list (2) -> turn (3); plus MAX_NESTING - 3 levels of a harmless extra field.
    extra = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    rec = (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "extra": '
        + extra
        + "}"
    )
    path = tmp_path / "s.jsonl"
    path.write_text(rec + "\n")
    assert len(load_site_data(path, DataConfig()).examples) == 1


# ------------------------------------------------------------------ invalid Unicode


@pytest.mark.parametrize(
    "record, field",
    [
        ({"instruction": "\ud800" + SECRET, "output": "y"}, "field 'instruction'"),
        ({"prompt": "p", "completion": SECRET + "\udfff"}, "field 'completion'"),
        ({"text": "ok \udc80"}, "field 'text'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\ud83d"}]},
            r"messages\[1\]\.content",
        ),
    ],
)
def test_a_lone_surrogate_is_refused_at_file_line_and_field_before_tokenization(
    tmp_path, tiny_tokenizer, record, field
):
    path = tmp_path / "s.jsonl"
    bad = json.dumps(record)  # json.dumps escapes it: "\ud800", as a file would hold it
    good = re.sub(r"\\ud[89a-f][0-9a-f]{2}", "", bad)
    assert good != bad
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    msg = str(ei.value)
    assert re.search(rf"{re.escape(str(path))}: .*line 2: {field} is not valid Unicode", msg), msg
    assert SECRET not in msg
    # Under the tolerance the record is skipped, and what is left tokenizes.
    data = load_site_data(path, DataConfig(max_invalid_fraction=0.5))
    assert data.n_invalid == 1 and data.invalid[0][0] == "line 2"
    tokenize_all(data.examples, tiny_tokenizer, DataConfig())


def test_a_lone_surrogate_in_a_json_list_names_the_record(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b\ud800"}]))
    with pytest.raises(DataError, match=r"record 1: field 'text' is not valid Unicode"):
        load_site_data(path, DataConfig())


def test_a_coordinator_cannot_send_a_system_prompt_no_tokenizer_can_encode(tiny_config):
    doc = json.loads(tiny_config.to_json())
    doc["data"]["system_prompt"] = "\ud800"
    with pytest.raises(ValueError, match="system_prompt"):
        FedTuneConfig.from_json(json.dumps(doc))


# ------------------------------------------------------------------ streaming keeps every format as it was


def test_a_streamed_json_list_reads_as_json_loads_does_across_chunk_boundaries(tmp_path):
    """~1.5 MB of records (numbers too, which a window could cut in the middle), read in 64 KB
    windows with a 2 KB record cap: exactly the records json.loads sees, in order."""
    recs = [{"prompt": 10**9 + i, "completion": i / 7, "n": [i, -i, 1e-5 * i]} for i in range(15_000)]
    for layout in ("list", "data", "indented"):
        path = tmp_path / f"{layout}.json"
        doc = recs if layout != "data" else {"note": "x" * 1000, "data": recs, "tail": [1, 2]}
        path.write_text(json.dumps(doc, indent=2 if layout == "indented" else None))
        got = [r for _, r, p in iter_raw_records(path, 2048)]
        assert got == recs, layout


def test_a_malformed_record_far_into_a_big_json_list_names_its_line(tmp_path):
    path = tmp_path / "s.json"
    lines = ["["] + [json.dumps({"text": f"{SECRET} {i}"}) + "," for i in range(20_000)] + ['{"text": "b" "c"}', "]"]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as ei:
        load_site_data(path, DataConfig())
    assert f"line {len(lines) - 1}: malformed JSON (Expecting ',' delimiter at column 14)" in str(ei.value)
    assert SECRET not in str(ei.value)


def test_json_layouts_still_read(tmp_path):
    """The shapes the whole-file reader accepted: one object, {"data": [...]}, JSONL in a .json
    file, an empty list; and what it refused still says why."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "a"}))
    assert load_site_data(one, DataConfig()).examples == [Example(text="a")]
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"data": [{"text": f"r{i}"} for i in range(300)], "meta": {"k": 1}}))
    assert len(load_site_data(big, DataConfig(max_record_bytes=1024)).examples) == 300  # the file is above the cap
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert load_site_data(lines, DataConfig()).examples == [Example(text="a"), Example(text="b")]
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(DataError, match="expected a JSON list of records"):
        load_site_data(scalar, DataConfig())
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]")
    with pytest.raises(DataError, match="no records"):
        load_site_data(empty, DataConfig())
    trailing = tmp_path / "trailing.json"
    trailing.write_text('[{"text": "a"}] x')
    with pytest.raises(DataError, match=r"line 1: malformed JSON \(Extra data"):
        load_site_data(trailing, DataConfig())
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"}, {"text": "b"')
    with pytest.raises(DataError, match=r"line 1: malformed JSON"):
        load_site_data(cut, DataConfig())
