"""Site file -> validated records -> chat-formatted, tokenized examples.

Readers: JSONL, JSON (a list of records, or {"data": [...]}) , CSV and Parquet.
Record formats (detected from the keys of the first valid record, or set in config):

- ``alpaca``            {"instruction", "input"?, "output"}
- ``messages``          {"messages": [{"role", "content"}, ...]} with at least one assistant turn
- ``prompt_completion`` {"prompt", "completion"}
- ``text``              {"text"}: plain text for continued pre-training; loss on every token

Chat examples are rendered with the tokenizer's own chat template, and the loss falls on
the assistant's tokens only (labels are -100 elsewhere). Errors name the file and the
line (JSONL, CSV), record index (JSON) or row (Parquet), and the field; they never quote
the record's content, because site records must not reach logs.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import DataConfig

IGNORE_INDEX = -100
FORMAT_KEYS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,39}$")
# Used only when a tokenizer ships no chat template (e.g. a plain base model).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class DataError(ValueError):
    """A data problem a site can act on: names the file and where in it."""


class RecordError(ValueError):
    """One record is unusable; the message names the field, never the content."""


@dataclass
class Example:
    """One normalised record: chat messages, or plain text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class SiteData:
    path: str
    format: str
    examples: list[Example]
    records_read: int
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, reason), no content

    @property
    def n_invalid(self) -> int:
        return len(self.invalid)


# ---------------------------------------------------------------- readers
#
# Every reader streams: whatever the file's size, memory stays within about one record
# (data.max_record_bytes), and a record above that cap is reported at its line without being
# read whole. JSON nesting is capped (MAX_NESTING) so that no record can exhaust the stack.

DEFAULT_MAX_RECORD_BYTES = 1 << 20
MAX_NESTING = 32  # containers inside one record (a messages record has 3)
_CHUNK = 1 << 16
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_long(cap: int) -> str:
    return f"longer than data.max_record_bytes ({cap} bytes)"


_TOO_DEEP = f"nested deeper than {MAX_NESTING} levels"


def _too_deep(value: Any) -> bool:
    """Whether ``value`` holds more than MAX_NESTING levels of lists/objects (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    return True
                stack.append((c, depth + 1))
    return False


class _Unreadable(ValueError):
    """One record's text cannot be read (too deep); the message names no content."""


def loads_record(text: str) -> Any:
    """``json.loads`` of one record's text with its nesting capped: json.JSONDecodeError when it
    is malformed, _Unreadable when it nests deeper than MAX_NESTING (never a RecursionError)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _Unreadable(_TOO_DEEP) from None
    if text.count("[") + text.count("{") > MAX_NESTING and _too_deep(value):
        raise _Unreadable(_TOO_DEEP)
    return value


def _raw_lines(f, cap: int) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None) for every line of a binary file, blank ones
    too. A line above ``cap`` bytes is skipped in chunks, never held whole."""
    lineno = 0
    while True:
        raw = f.readline(cap + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > cap and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(_CHUNK * 16)
            yield lineno, None, _too_long(cap)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, f"not valid UTF-8 (byte {e.start})"
            continue
        yield lineno, text.lstrip("\ufeff") if lineno == 1 else text, None


def _decode_lines(path: Path, cap: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line number, text or None, problem or None) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, text, problem in _raw_lines(f, cap):
            if problem or text.strip():
                yield lineno, text, problem


def _read_jsonl(path: Path, cap: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    for lineno, text, problem in _decode_lines(path, cap):
        where = f"line {lineno}"
        if problem:
            yield where, None, problem
            continue
        try:
            yield where, loads_record(text), None
        except json.JSONDecodeError as e:
            yield where, None, f"malformed JSON ({e.msg} at column {e.colno})"
        except _Unreadable as e:
            yield where, None, str(e)


class _Overlong(DataError):
    pass


class _JsonText:
    """A JSON file read in chunks: a window of its text (``buf``), the read position in it, and
    the line and column where the window starts, for errors that name the line."""

    def __init__(self, f, path: Path, cap: int):
        self.f, self.path, self.cap = f, path, cap
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.col, self.nbytes = 1, 1, 0

    def where(self, i: int) -> tuple[int, int]:
        seg = self.buf[:i]
        nl = seg.count("\n")
        return self.line + nl, (i - seg.rfind("\n")) if nl else self.col + i

    def more(self, n: int = _CHUNK) -> bool:
        """Drop the text before ``pos`` and append about ``n`` more bytes of text; False at the end."""
        if self.eof:
            return False
        raw = self.f.read(n)
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count("\n") + raw[: max(0, e.start - pending)].count(b"\n")
            raise DataError(
                f"{self.path}: line {line}: not valid UTF-8 (byte {self.nbytes - pending + e.start})"
            ) from None
        if self.nbytes == 0:
            text = text.lstrip("\ufeff")
        self.nbytes += len(raw)
        self.eof = not raw
        self.line, self.col = self.where(self.pos)
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return bool(raw)

    def peek(self) -> str:
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def malformed(self, i: int, what: str) -> DataError:
        line, col = self.where(i)
        return DataError(f"{self.path}: line {line}: malformed JSON ({what} at column {col})")

    def value(self, label: str) -> Any:
        """The JSON value at ``pos`` (after :meth:`peek`), at most ``cap`` characters long."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise DataError(f"{self.path}: line {self.where(self.pos)[0]}: {label}: {_TOO_DEEP}") from None
            except json.JSONDecodeError as e:
                # A value cut by the window's end fails near that end (or as a string that does not end):
                # read on. Any other failure is in the file itself.
                cut = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if not cut or self.eof:
                    raise self.malformed(e.pos, e.msg) from None
                self._grow(label)
                continue
            if end == len(self.buf) and not self.eof:  # a number may go on in the next chunk
                self._grow(label)
                continue
            if end - self.pos > self.cap:
                raise self._overlong(label)
            self.pos = end
            return value

    def _grow(self, label: str) -> None:
        pending = len(self.buf) - self.pos
        if pending > self.cap:
            raise self._overlong(label)
        self.more(max(_CHUNK, pending))  # doubling: the retries cost at most twice the value's length

    def _overlong(self, label: str) -> _Overlong:
        return _Overlong(f"{self.path}: line {self.where(self.pos)[0]}: {label} is {_too_long(self.cap)}")

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if c == "" or c not in chars:
            raise self.malformed(self.pos, what if c else f"{what}, found the end of the file")
        self.pos += 1
        return c

    def array(self, first: int = 0) -> Iterator[tuple[str, Any, str | None]]:
        """The records of the list that starts at ``pos``, one at a time."""
        self.expect("[", "Expecting '['")
        i = first
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            self.peek()
            yield _record(f"record {i}", self.value(f"record {i}"))
            i += 1
            if self.expect(",]", "Expecting ',' delimiter") == "]":
                return


def _json_records(data: Any, path: Path) -> Iterator[tuple[str, Any, str | None]]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    for i, rec in enumerate(data):
        yield _record(f"record {i}", rec)


def _record(where: str, rec: Any) -> tuple[str, Any, str | None]:
    return (where, None, _TOO_DEEP) if _too_deep(rec) else (where, rec, None)


def _read_json(path: Path, cap: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """A JSON list of records, streamed record by record; {"data": [...]} likewise; one object;
    or JSONL in a .json file (an object followed by more)."""
    with path.open("rb") as f:
        s = _JsonText(f, path, cap)
        c = s.peek()
        if c == "[":
            yield from s.array()
        elif c == "{":
            try:
                first = s.value("the first record")
            except _Overlong:  # pos is still at its '{' (a failed read moves nothing)
                yield from _big_json_object(s)
            else:
                if s.peek():
                    # One JSON object per line is JSONL, whatever the file is called.
                    yield from _read_jsonl(path, cap)
                    return
                yield from _json_records(first, path)
                return
        elif c:
            yield from _json_records(s.value("the file's value"), path)
        if s.peek():
            raise s.malformed(s.pos, "Extra data")


def _big_json_object(s: _JsonText) -> Iterator[tuple[str, Any, str | None]]:
    """An object above the record cap: {"data": [...]} (streamed), else one record too long."""
    s.expect("{", "Expecting '{'")
    found = False
    if s.peek() == "}":
        s.pos += 1
    else:
        while True:
            if s.peek() != '"':
                raise s.malformed(s.pos, "Expecting property name enclosed in double quotes")
            key = s.value("a field name")
            s.expect(":", "Expecting ':' delimiter")
            if s.peek() == "[" and key == "data" and not found:
                yield from s.array()
                found = True
            else:
                s.value("record 0: " + (f"field '{key}'" if _FIELD_NAME.match(key) else "a field"))
            if s.expect(",}", "Expecting ',' delimiter") == "}":
                break
    if not found:
        raise DataError(f"{s.path}: record 0 is {_too_long(s.cap)}")


def _read_csv(path: Path, cap: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """CSV streamed row by row; a row (with its quoted line breaks) above ``cap`` bytes stops the
    read at its line (a CSV cannot be resynchronised inside a quoted field)."""
    with path.open("rb") as f:
        taken = [0, 0]  # bytes of the current row so far, line number

        def lines() -> Iterator[str]:
            for lineno, text, problem in _raw_lines(f, cap):
                taken[1] = lineno
                if problem:
                    raise DataError(f"{path}: line {lineno}: {problem}")
                taken[0] += len(text)
                if taken[0] > cap:
                    raise DataError(f"{path}: line {lineno}: a row {_too_long(cap)}")
                yield text

        reader = csv.DictReader(lines())

        def step(fn):
            taken[0] = 0
            old = csv.field_size_limit(cap)
            try:
                return fn()
            except csv.Error as e:
                raise DataError(f"{path}: line {taken[1]}: malformed CSV ({e})") from None
            finally:
                csv.field_size_limit(old)

        if not step(lambda: reader.fieldnames):
            return
        while True:
            row = step(lambda: next(reader, None))
            if row is None:
                return
            where = f"line {reader.line_num}"
            if None in row:
                yield where, None, f"{len(row[None])} more field(s) than the header's {len(reader.fieldnames)}"
                continue
            yield where, {k: v for k, v in row.items() if v not in (None, "")}, None


def _size(value: Any) -> int:
    """About how many bytes a decoded record holds (its text and numbers), without recursion."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
            total += sum(len(k) for k in v if isinstance(k, str))
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, (str, bytes)):
            total += len(v)
        else:
            total += 8
    return total


def _read_parquet(path: Path, cap: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """Parquet read in batches of rows (never the whole table at once)."""
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=256)
        i = 0
        for batch in batches:
            for rec in batch.to_pylist():
                where = f"row {i}"
                i += 1
                if _size(rec) > cap:
                    yield where, None, _too_long(cap)
                elif _too_deep(rec):
                    yield where, None, _TOO_DEEP
                else:
                    yield where, {k: v for k, v in rec.items() if v is not None}, None
    except Exception as e:  # pyarrow raises several types for a bad file
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None


READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def iter_raw_records(
    path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, record or None, problem or None) for each record in the file, streamed
    (memory: about one record, at most ``max_record_bytes``)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{p}: unknown data file type {p.suffix!r}; expected one of {', '.join(sorted(READERS))}")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file, no records")
    yield from reader(p, max_record_bytes)


# ---------------------------------------------------------------- formats


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got a {type(record).__name__}")
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return fmt
    # Field names are shown only when they look like names: in a CSV without a header row
    # the "names" are the first record's content, which must not reach a log.
    names = sorted(record)
    if all(isinstance(k, str) and _FIELD_NAME.match(k) for k in names):
        shown = f"fields {names[:8]}"
    else:
        shown = f"{len(names)} fields whose names are not identifiers (is a CSV header row missing?)"
    raise RecordError(
        f"cannot tell the format from {shown}; expected instruction+output, messages, prompt+completion, or text"
    )


def _text_field(record: dict, key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise RecordError(f"missing field '{key}'")
        return ""
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV/Parquet numbers are fine as text
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be text, got {type(value).__name__}")
    _check_unicode(value, f"field '{key}'")
    if required and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _check_unicode(value: str, name: str) -> None:
    """Text a tokenizer can encode: JSON's escapes can make a lone surrogate ("\\ud800"), which
    no UTF-8 encoder accepts; refused here, with its field, rather than mid-tokenization."""
    m = _SURROGATE.search(value)
    if m:
        raise RecordError(f"{name} is not valid Unicode (a lone surrogate at character {m.start()})")


def normalize_record(record: Any, fmt: str) -> Example:
    """One raw record -> Example, or RecordError naming what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got a {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return Example(
            messages=[
                {"role": "user", "content": user},
                {"role": "assistant", "content": _text_field(record, "output")},
            ]
        )
    if fmt == "prompt_completion":
        return Example(
            messages=[
                {"role": "user", "content": _text_field(record, "prompt")},
                {"role": "assistant", "content": _text_field(record, "completion")},
            ]
        )
    if fmt == "text":
        return Example(text=_text_field(record, "text"))
    if fmt == "messages":
        msgs = record.get("messages")
        if isinstance(msgs, str):  # CSV/Parquet cells may hold the list as JSON text
            try:
                msgs = loads_record(msgs)
            except json.JSONDecodeError:
                raise RecordError("field 'messages' is text that is not a JSON list") from None
            except _Unreadable as e:
                raise RecordError(f"field 'messages': {e}") from None
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("field 'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RecordError(f"messages[{i}] must be an object with role and content")
            role = m.get("role")
            if role not in ROLES:
                raise RecordError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
            content = m.get("content")
            if not isinstance(content, str):
                raise RecordError(f"messages[{i}].content must be text")
            _check_unicode(content, f"messages[{i}].content")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise RecordError("'messages' has no non-empty assistant turn to learn from")
        return Example(messages=out)
    raise RecordError(f"unknown format {fmt!r}")


@dataclass
class ValidRecords:
    """A file's usable records, each with where it is and what it normalises to."""

    path: Path
    format: str | None
    valid: list[tuple[str, Any, Example]]  # (where, raw record, example)
    records_read: int
    invalid: list[tuple[str, str]]  # (where, why)


def read_valid_records(path: str | Path, cfg: DataConfig) -> ValidRecords:
    """Read and validate a file's records. Bad records are skipped and counted; if they exceed
    ``cfg.max_invalid_fraction`` the file is refused with a DataError listing where the first
    problems are."""
    p = Path(path)
    fmt = None if cfg.format == "auto" else cfg.format
    valid: list[tuple[str, Any, Example]] = []
    invalid: list[tuple[str, str]] = []
    n = 0
    for where, record, problem in iter_raw_records(p, cfg.max_record_bytes):
        n += 1
        if problem is None:
            try:
                if fmt is None:
                    fmt = detect_format(record)
                valid.append((where, record, normalize_record(record, fmt)))
                continue
            except RecordError as e:
                problem = str(e)
        invalid.append((where, problem))
    if n == 0:
        raise DataError(f"{p}: no records")
    if (problem := tolerance_problem(len(invalid), n, cfg.max_invalid_fraction)) is not None:
        shown = "; ".join(f"{w}: {why}" for w, why in invalid[:5])
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        raise DataError(f"{p}: {problem}: {shown}{more}")
    return ValidRecords(p, fmt, valid, n, invalid)


# The flag of ftsim, ftserver, ftclient check and fteval that sets data.max_invalid_fraction.
TOLERANCE = "--max-invalid-fraction"


def tolerance_problem(n_invalid: int, n: int, fraction: float) -> str | None:
    """Why ``n_invalid`` unusable records of ``n`` refuse a file at the tolerance ``fraction``
    (data.max_invalid_fraction), naming the flag every tool takes and the least value that would
    skip them; None when they are within it. The one rule: each tool and ``ftclient check`` apply it."""
    if n_invalid == 0 or n_invalid <= fraction * n:
        return None
    if n_invalid >= n:
        return f"all {n} records unusable"
    least = math.ceil(n_invalid / n * 1000) / 1000  # rounded up: the value given as the fix does skip them
    return (
        f"{n_invalid} of {n} records unusable, above the tolerance {TOLERANCE} {fraction:g} "
        f"(data.max_invalid_fraction); fix them, or skip them with {TOLERANCE} {least:g} or more"
    )


def load_site_data(path: str | Path, cfg: DataConfig) -> SiteData:
    """Read, validate and normalise a site file (:func:`read_valid_records`)."""
    r = read_valid_records(path, cfg)
    return SiteData(
        path=str(r.path),
        format=r.format or "unknown",
        examples=[ex for _, _, ex in r.valid],
        records_read=r.records_read,
        invalid=r.invalid,
    )


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded hold-out: (train, eval). Keeps at least one training example."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------- tokenization


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def chat_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Render messages with the chat template as (text, is_answer) segments.

    Each assistant turn's span is what the template adds between the prompt for that turn
    (add_generation_prompt=True) and the conversation including it, so the end-of-turn
    token belongs to the answer and the model learns to stop.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise RecordError("the chat template does not render turns as a growing prefix; cannot mask prompts")
        segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    return segments


def tokenize_example(
    example: Example, tokenizer, max_length: int, system_prompt: str | None = None
) -> dict[str, list[int]] | None:
    """-> {"input_ids", "labels"} truncated to max_length, or None if no answer token survives."""
    if example.is_chat:
        segments = chat_segments(tokenizer, _with_system(example.messages, system_prompt))
    else:
        segments = [(example.text + (tokenizer.eos_token or ""), True)]
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if is_answer else [IGNORE_INDEX] * len(toks))
    return truncate_item({"input_ids": ids, "labels": labels}, max_length)


def truncate_item(item: dict[str, list[int]], max_length: int) -> dict[str, list[int]] | None:
    """Cut a tokenized example to max_length; None if no answer token (after the first) survives."""
    ids, labels = item["input_ids"][:max_length], item["labels"][:max_length]
    if not ids or all(t == IGNORE_INDEX for t in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def prompt_and_reference(example: Example, tokenizer, system_prompt: str | None = None) -> tuple[str, str] | None:
    """The generation prompt up to the last assistant turn, and that turn's text."""
    if not example.is_chat:
        return None
    msgs = _with_system(example.messages, system_prompt)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
    return prompt, msgs[last]["content"]


@dataclass
class TokenizedSet:
    items: list[dict[str, list[int]]]
    dropped_too_long: int

    def __len__(self) -> int:
        return len(self.items)


def tokenize_all(examples: list[Example], tokenizer, cfg: DataConfig) -> TokenizedSet:
    items, dropped = [], 0
    for ex in examples:
        t = tokenize_example(ex, tokenizer, cfg.max_length, cfg.system_prompt)
        if t is None:
            dropped += 1
        else:
            items.append(t)
    return TokenizedSet(items, dropped)


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each [batch, max_len]."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
