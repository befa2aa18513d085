"""docs/configuration.md, generated from the schema in common/config.py: every key with its type
and allowed values, its default, the flags that set it and its description.

    python -m fedtune.common.config_reference --write   # regenerate docs/configuration.md
    python -m fedtune.common.config_reference --check   # exit 1 when it is stale
    python -m fedtune.common.config_reference           # print it

The page is a function of the schema alone (no dates, no paths, schema order), so a test
regenerates it in memory and compares it with the committed file
(tests/unit/test_config_reference.py). To change what it says, change the schema: a Field's
description, bounds or flag, a section's docstring.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel

from fedtune.common.config import (
    FLAG_TOOLS,
    ConfigFlag,
    ConfigKey,
    FedTuneConfig,
    annotation_alternatives,
    config_flags,
    config_keys,
    yaml_text,
)

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"  # in a source checkout
COMMAND = "python -m fedtune.common.config_reference --write"
# ftsim reads simulation.partition itself (simulations/cli.py: PARTITION_KEYS, checked by the test).
FTSIM_PARTITION_KEYS = ("data", "spec", "sites", "label_key", "min_records")

_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped everywhere, angle brackets outside code spans."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _code(value: str) -> str:
    return f"`{value}`"


def _bounds(metadata: list[Any]) -> str:
    found = {}
    for m in metadata:
        for attr in _BOUNDS:
            if getattr(m, attr, None) is not None:
                found[attr] = getattr(m, attr)
    low = next(((k, found[k]) for k in ("ge", "gt") if k in found), None)
    high = next(((k, found[k]) for k in ("le", "lt") if k in found), None)
    if low and high:  # an interval: [1, 100] includes its ends, (0, 1) does not
        return f"{'[' if low[0] == 'ge' else '('}{yaml_text(low[1])}, {yaml_text(high[1])}{']' if high[0] == 'le' else ')'}"
    return " ".join(f"{_BOUNDS[side[0]]} {yaml_text(side[1])}" for side in (low, high) if side)


def _pattern(metadata: list[Any]) -> str | None:
    return next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)


def _kind(annotation: Any, metadata: list[Any]) -> str:
    """One alternative of a key's type, in words."""
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return _kind(inner, [*metadata, *(m for e in extra for m in getattr(e, "metadata", [e]))])
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(_code(yaml_text(v)) for v in get_args(annotation))
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "list of entries (their keys below)"
        return f"list of {_kind(item, [])}s"
    names = {bool: "true or false", int: "integer", float: "number", str: "string", type(None): "null"}
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds, pattern = _bounds(metadata), _pattern(metadata)
    if annotation in (int, float) and bounds:
        text += (" in " if bounds[0] in "[(" else " ") + bounds
    if annotation is str and pattern:
        text += f" matching {_code(pattern)}"
    return text


def type_text(key: ConfigKey) -> str:
    """'integer in [1, 100000]', 'one of `auto`, `cpu`, `cuda`', 'number in (0, 1000000.0], or one of `auto`, `off`, or null'."""
    kinds = [_kind(a, key.field.metadata) for a in annotation_alternatives(key.field.annotation)]
    return kinds[0] if len(kinds) == 1 else ", or ".join(kinds)


def default_text(key: ConfigKey) -> str:
    if key.field.is_required():
        return "required"
    return _code(yaml_text(key.field.get_default(call_default_factory=True)))


def _flag_text(f: ConfigFlag) -> str:
    said = f": sets {yaml_text(f.const)}" if f.const is not None else ""
    return f"{_code(f.usage())} ({', '.join(f.tools)}{said})"


def _paragraph(doc: str | None) -> str:
    """A section's docstring as one paragraph (reST's ``code`` as Markdown's `code`)."""
    return " ".join(inspect.cleandoc(doc).split()).replace("``", "`") if doc else ""


def render() -> str:
    keys = config_keys()
    flags_by_key: dict[str, list[ConfigFlag]] = {}
    for f in config_flags():
        flags_by_key.setdefault(f.key, []).append(f)
    sections = list(FedTuneConfig.model_fields)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the schema in common/config.py by `{COMMAND}`: edit the schema, not this file. -->",
        "",
        "One schema (pydantic, `common/config.py`) is read from a YAML or TOML file (`--config`); `--set KEY=VALUE` "
        "and the flags below override it. A key's value comes from, last one winning: its default, the config file, "
        "`--set`, a flag. Unknown keys, wrong types, NaN/Inf and out-of-range values fail at start with a message "
        "that names the file and the key. A dotted key is its place in the file: `federation.rounds: 5` is",
        "",
        "```yaml",
        "federation:",
        "  rounds: 5",
        "```",
        "",
        "Sections: " + ", ".join(f"[{s}](#{s})" for s in sections) + ".",
        "",
        "## Command-line flags",
        "",
        "Each of these flags sets one key (the other flags of the tools, such as `--config`, `--resume` or `--set`, "
        "are in their `--help`). A flag not given leaves the key to the config file, or to its default.",
        "",
        "| flag | key | " + " | ".join(FLAG_TOOLS) + " |",
        "| --- | --- | " + " | ".join(":-:" for _ in FLAG_TOOLS) + " |",
    ]
    for f in config_flags():
        marks = " | ".join(
            ("sets " + _code(yaml_text(f.const)) if f.const is not None else "✓") if t in f.tools else ""
            for t in FLAG_TOOLS
        )
        out.append(f"| {_code(f.usage())} | {_code(f.key)} | {marks} |")
    for section in sections:
        model = FedTuneConfig.model_fields[section].annotation
        out += ["", f"## {section}", ""]
        if _paragraph(model.__doc__):
            out += [_paragraph(model.__doc__), ""]
        if section == "simulation":
            out += [
                "ftsim also reads `simulation.partition`, the config file's form of `--data`, `--partition`, "
                "`--sites` and `--label-key` (one dataset split into virtual sites), with the keys "
                + ", ".join(_code(k) for k in FTSIM_PARTITION_KEYS)
                + "; see `ftsim --help`.",
                "",
            ]
        out += ["| key | type | default | flag | description |", "| --- | --- | --- | --- | --- |"]
        for key in keys:
            if key.key.split(".", 1)[0] != section:
                continue
            flag_cell = "; ".join(_flag_text(f) for f in flags_by_key.get(key.key, []))
            out.append(
                f"| {_code(key.key)} | {_cell(type_text(key))} | {_cell(default_text(key))} | {_cell(flag_cell)} "
                f"| {_cell(key.field.description or '')} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedtune.common.config_reference",
        description="Print the configuration reference generated from the schema, or write or check docs/configuration.md.",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help=f"write it to {DOC_PATH}")
    what.add_argument("--check", action="store_true", help=f"exit 1 when {DOC_PATH} differs from it")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
        return 0
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else None
        if current != text:
            print(f"{DOC_PATH} is stale: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
