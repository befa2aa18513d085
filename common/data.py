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

import csv
import io
import json
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

def _decode_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line number, text or None, decode problem or None) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 (byte {e.start})"
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield lineno, text, None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    for lineno, text, problem in _decode_lines(path):
        where = f"line {lineno}"
        if problem:
            yield where, None, problem
            continue
        try:
            yield where, json.loads(text), None
        except json.JSONDecodeError as e:
            yield where, None, f"malformed JSON ({e.msg} at column {e.colno})"


def _read_json(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    try:
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # One JSON object per line is JSONL, whatever the file is called.
        if e.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, rec in enumerate(data):
        yield f"record {i}", rec, None


def _read_csv(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    try:
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return
    for row in reader:
        where = f"line {reader.line_num}"
        if None in row:
            yield where, None, f"{len(row[None])} more field(s) than the header's {len(reader.fieldnames)}"
            continue
        yield where, {k: v for k, v in row.items() if v not in (None, "")}, None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"row {i}", {k: v for k, v in rec.items() if v is not None}, None


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def iter_raw_records(path: str | Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, record or None, problem or None) for each record in the file."""
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
    yield from reader(p)


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
    raise RecordError(f"cannot tell the format from {shown}; expected instruction+output, messages, prompt+completion, or text")


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
    if required and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def normalize_record(record: Any, fmt: str) -> Example:
    """One raw record -> Example, or RecordError naming what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got a {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(record, "output")}])
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
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise RecordError("field 'messages' is text that is not a JSON list") from None
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
    for where, record, problem in iter_raw_records(p):
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
    if invalid and len(invalid) > cfg.max_invalid_fraction * n:
        shown = "; ".join(f"{w}: {why}" for w, why in invalid[:5])
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        tol = f"{cfg.max_invalid_fraction:g}"
        raise DataError(
            f"{p}: {len(invalid)} of {n} records unusable, above the tolerance data.max_invalid_fraction={tol}: "
            f"{shown}{more}"
        )
    return ValidRecords(p, fmt, valid, n, invalid)


def load_site_data(path: str | Path, cfg: DataConfig) -> SiteData:
    """Read, validate and normalise a site file (:func:`read_valid_records`)."""
    r = read_valid_records(path, cfg)
    return SiteData(path=str(r.path), format=r.format or "unknown", examples=[ex for _, _, ex in r.valid], records_read=r.records_read, invalid=r.invalid)


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
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return segments


def tokenize_example(example: Example, tokenizer, max_length: int, system_prompt: str | None = None) -> dict[str, list[int]] | None:
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
