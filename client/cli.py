"""ftclient: a site's command line.

    ftclient --server HOST:PORT --data FILE [--eval-data FILE] [--name NAME]
             [--ca-cert ca.crt] [--key site_key] [--device auto|cpu|cuda] [--threads N]
        joins the federation: starts a Flower SuperNode (TLS, authenticated by the site key)
        and serves its tasks in this process, where the base model stays loaded between
        rounds. The data paths and device stay here, in the SuperNode's node config; only
        adapter updates, counts and metrics leave the site. Runs until stopped (Ctrl-C, SIGTERM).
    ftclient check --data FILE [--model M] [--max-length N] [--max-record-bytes B]
        validates the site's data locally and prints counts, token-length statistics and
        problems (file, line, field), without contacting anyone. The file is streamed: a
        record above B bytes (default 1 MiB), nesting deeper than 32 levels or text that is
        not valid Unicode is a problem at its line, in seconds and bounded memory.
    ftclient keygen --out DIR [--force]
        makes the site's key pair: DIR/site_key stays here, DIR/site_key.pub goes to the coordinator.

Exit codes: the table below (``fedtune.common.exits``, the same for all four commands): 0 done
(check: usable; join: stopped by the operator), 1 failed while running (TLS failures say so),
2 bad arguments or data (check: NOT usable), 3 refused by the coordinator (this site's key is
not registered there), 130 interrupted.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from fedtune.common import exits


def check(args: argparse.Namespace) -> int:
    """``ftclient check``: read and tokenize the site's data file as training would, and say what
    it holds (counts, token lengths, where each problem is, never what it holds) and whether it is
    usable by the rule every tool applies. -> 0 usable; 2 NOT usable, bad settings, or an unreadable
    file or model (``fedtune.common.exits``)."""
    from fedtune.common.data import DataError, read_valid_records
    from fedtune.common.modeling import ModelError, load_tokenizer, resolve_model_source

    settings = _check_settings(args)
    if isinstance(settings, str):
        print(f"ftclient check: {settings}", file=sys.stderr)
        return exits.BAD_INPUT
    cfg, model = settings
    try:
        # Streamed: memory stays about one record (--max-record-bytes) whatever the file holds. Read
        # at full tolerance so every problem is listed; the verdict applies the run's tolerance.
        data = read_valid_records(args.data, cfg.model_copy(update={"max_invalid_fraction": 1.0}))
        source, is_local = resolve_model_source(model)
        tok = load_tokenizer(source, is_local)
    except (DataError, ModelError) as e:
        print(f"ftclient check: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    full, invalid = _tokenize_untruncated(data, tok, cfg)
    n_valid = len(data.valid) - (len(invalid) - len(data.invalid))
    usable = _print_check(args.data, data, cfg, full, invalid, n_valid)
    verdict = _verdict(data, cfg, len(invalid) - len(data.invalid), usable)
    print(f"verdict         {verdict}")
    return exits.OK if verdict.startswith("usable") else exits.BAD_INPUT


def _verdict(data, cfg, untokenizable: int, usable: int) -> str:
    """What ftsim, a site and fteval would do with the file, by their rule (data.tolerance_problem
    at the same data.max_invalid_fraction): 'usable...' or 'NOT usable: why'."""
    from fedtune.common.data import TOLERANCE, tolerance_problem

    refused = tolerance_problem(len(data.invalid), data.records_read, cfg.max_invalid_fraction)
    if refused is not None:
        return f"NOT usable: {refused}"
    if untokenizable:
        return f"NOT usable: {untokenizable} record(s) cannot be tokenized (see the problems above)"
    if usable == 0:
        return "NOT usable: no example keeps part of its answer within max_length, nothing to train on"
    if data.invalid:
        return (
            f"usable: {len(data.invalid)} of {data.records_read} records will be skipped "
            f"(within {TOLERANCE} {cfg.max_invalid_fraction:g})"
        )
    return "usable"


def _check_settings(args: argparse.Namespace):
    """The data and model settings ``ftclient check`` was given -> (DataConfig, ModelConfig), or
    what is wrong, named by its key (e.g. ``data.max_record_bytes: ...``)."""
    from pydantic import ValidationError

    from fedtune.common.config import DataConfig, ModelConfig, config_overrides

    given = config_overrides(args, "ftclient check")  # --format, --max-length, ...: the schema's flags
    try:
        return DataConfig(**_section(given, "data")), ModelConfig(**_section(given, "model"))
    except ValidationError as e:
        section = "model" if e.title == ModelConfig.__name__ else "data"
        return f"{section}.{e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}"


def _tokenize_untruncated(data, tok, cfg) -> tuple[list, list]:
    """Each valid record tokenized once untruncated (for its length) -> (the tokenized examples,
    every invalid record's (where, why): the reader's and those that cannot be tokenized)."""
    from fedtune.common.data import RecordError, tokenize_example

    full, invalid = [], list(data.invalid)
    for where, _, ex in data.valid:
        try:
            t = tokenize_example(ex, tok, 10**9, cfg.system_prompt)
        except (RecordError, ValueError, TypeError) as e:  # named by where it is, never by what it holds
            invalid.append((where, f"cannot be tokenized ({type(e).__name__})"))
            continue
        if t is not None:
            full.append(t)
    return full, invalid


def _print_check(path, data, cfg, full: list, invalid: list, n_valid: int) -> int:
    """Print the file's counts, token lengths and first problems. -> how many examples keep part
    of their answer when cut to ``data.max_length`` (the usable ones)."""
    from fedtune.common.data import truncate_item

    lengths = sorted(len(t["input_ids"]) for t in full)
    usable = sum(1 for t in full if truncate_item(t, cfg.max_length) is not None)
    print(f"file            {path}")
    print(f"format          {data.format or 'unknown'}")
    print(f"records         {data.records_read}")
    print(f"valid           {n_valid}")
    print(f"invalid         {len(invalid)}")
    if lengths:
        p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
        median = int(statistics.median(lengths))
        print(f"tokens/example  min {lengths[0]}  median {median}  p95 {p95}  max {lengths[-1]}")
        over = sum(1 for n in lengths if n > cfg.max_length)
        print(
            f"over max_length {over} of {len(lengths)} (max_length {cfg.max_length}: truncated; "
            f"{len(lengths) - usable} lose their whole answer and are dropped)"
        )
    for where, why in invalid[:20]:
        print(f"problem         {path}: {where}: {why}")
    if len(invalid) > 20:
        print(f"problem         ... and {len(invalid) - 20} more")
    return usable


def _section(overrides: dict, section: str) -> dict:
    """{'data.max_length': 256, 'model.name': 'm'}, 'data' -> {'max_length': 256}."""
    return {k.split(".", 1)[1]: v for k, v in overrides.items() if k.split(".", 1)[0] == section}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check":
        from fedtune.common.config import add_config_flags

        p = argparse.ArgumentParser(
            prog="ftclient check",
            description="Validate a site's data file locally; nothing is sent. Token lengths are measured with "
            "--model's tokenizer.",
            epilog=exits.epilog(),
            formatter_class=exits.HelpFormatter,
        )
        p.add_argument(
            "--data", required=True, metavar="FILE", help="the site's data file (JSONL, JSON, CSV or Parquet)"
        )
        add_config_flags(p, "ftclient check", "each as the config key in brackets (every key: docs/configuration.md)")
        return check(p.parse_args(argv[1:]))
    if argv and argv[0] == "keygen":
        from .keys import create_site_keys

        p = argparse.ArgumentParser(
            prog="ftclient keygen",
            description="Make this site's key pair for site authentication.",
            epilog=exits.epilog(),
            formatter_class=exits.HelpFormatter,
        )
        p.add_argument("--out", required=True, help="folder for site_key (private, stays here) and site_key.pub")
        p.add_argument("--force", action="store_true", help="replace an existing key pair")
        args = p.parse_args(argv[1:])
        try:
            priv, pub = create_site_keys(args.out, force=args.force)
        except FileExistsError as e:
            print(f"ftclient keygen: {e}", file=sys.stderr)
            return exits.BAD_INPUT
        print(f"wrote {priv} (private: keep it here, mode 0600) and {pub}")
        print(f"give {pub} to the coordinator to register this site")
        return exits.OK
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(exits.epilog())
        return exits.OK
    from .join import join, join_parser

    return join(join_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
