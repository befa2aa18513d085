"""The run record: metrics.json's schema as pydantic models, versioned.

metrics.json is what a run leaves for people and programs: the report (:mod:`.report`), the
TensorBoard events (:mod:`.events`), ftsim's baselines, ``--resume`` and the tests all read it.
Its shape is declared here once, so a reader asks the record for ``record.rounds[1].sites["bank"].steps``
instead of guessing keys, and a writer that adds a key adds it here first.

- :func:`write_record` validates a document against :class:`RunRecord` and writes it atomically,
  as the same JSON as before this module existed (plus ``schema_version``), so readers of the raw
  JSON (scripts, benchmarks) keep working. The writer is ours: an unknown key or a wrong type is a
  bug, refused with the key's path (``rounds[1].sites.bank.steps``).
- :func:`read_record` reads one back: a record of this version, or the unversioned record earlier
  releases wrote (the same shape; migrated by adding ``schema_version``), so ``--resume`` works on a
  run made by the previous version. A newer or unknown ``schema_version`` is refused with a message
  that says which versions this fedtune reads.

Values are checked for type, not range: the record records (a NaN loss a site reported stays a
NaN, as json writes it), and the report renders what is not finite as a dash.

``config`` is the run's whole config as ``FedTuneConfig.model_dump(mode="json")``: it has its own
schema (:mod:`fedtune.common.config`), read with ``load_config(None, base=record.config)``; the
record keeps it as a plain mapping. ``baselines`` is ftsim's section (``ftsim --baselines``); its
schema is ftsim's (:class:`fedtune.simulations.baselines.BaselinesRecord`), and the coordinator only
carries it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fedtune.common.checkpoint import atomic_write_json

SCHEMA_VERSION = 1
# The versions read_record reads; None: the unversioned record of earlier releases (the shape of version 1).
READABLE_VERSIONS = (None, 1)
FILE = "metrics.json"


class RecordError(ValueError):
    """A run record that does not match the schema, or of a version this fedtune does not read."""


class _Record(BaseModel):
    # Our writer: every key declared (extra="forbid"), no coercion ("3" is not an int, 1 is not a
    # bool); NaN/Inf allowed, since a record reports what happened.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=True)


# ---------------------------------------------------------------------------------------- per site


class LocalStop(_Record):
    """train.local_patience: the site checked its validation loss and kept its best weights."""

    stopped_at: int | None = None  # the step it stopped at; None: it ran all its steps
    best_step: int
    val_start: float | None = None
    val_best: float | None = None


class LayerPull(_Record):
    """One layer's share of a site's update: its norm and its cosine to the aggregate."""

    update_norm: float
    cosine_to_aggregate: float | None = None  # None: a norm was 0


class SiteRound(_Record):
    """One site in one round: its training reply (or why there was none) and its evaluation.

    A round-0 entry has only the evaluation; a site that refused has ``status`` and ``reason``
    (and its data's problem counts); a site not drawn for training has only the evaluation."""

    # Outcome
    status: str | None = None  # "ok", "rejected" (its update failed validation), or the site's own word
    reason: str | None = None
    eval_status: str | None = None  # why this site has no evaluation this round
    # Training, as the site reported it
    train_loss: float | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    examples: int | None = None  # None once an update is rejected
    steps: int | None = None
    planned_steps: int | None = None
    train_seconds: float | None = None
    receive_seconds: float | None = None
    startup_seconds: float | None = None
    invalid_records: int | None = None
    # A refusing site's data problems (its metrics' keys, "-" read as "_")
    num_examples: int | None = None
    records: int | None = None
    dropped_too_long: int | None = None
    rank: int | None = None  # a LoRA site's rank (mixed ranks: HetLoRA)
    update_norm_before_clip: float | None = None
    clipped: bool | None = None  # the site clipped its update
    metrics_dropped: int | None = None  # unknown or mistyped metric keys the coordinator dropped
    local_stop: LocalStop | None = None
    # What the coordinator made of it
    bytes_sent: int | None = None
    clipped_by_coordinator: bool | None = None
    weight: float | None = None  # its weight in the mean
    weight_capped: bool | None = None
    clipped_values: int | None = None  # secure aggregation: values the quantizer clipped
    summed: bool | None = None  # secure aggregation: in the unmasked sum
    update_norm: float | None = None  # where the site pulled (not under secure aggregation or DP)
    cosine_to_aggregate: float | None = None
    by_layer: dict[str, LayerPull] | None = None
    # Evaluation of the round's global adapter
    eval_loss: float | None = None
    exact_match: float | None = None
    eval_examples: int | None = None
    # federation.personalization: the site's personalized model on the same examples, and its private steps
    personal_eval_loss: float | None = None
    personal_exact_match: float | None = None
    personal_steps: int | None = None
    eval_metrics_dropped: int | None = None


# --------------------------------------------------------------------------------------- per round


class Scores(_Record):
    """The federated metrics: the sites' example-weighted means (a key no site has is left out)."""

    eval_loss: float | None = None
    exact_match: float | None = None
    personal_eval_loss: float | None = None  # federation.personalization: the personalized models'
    personal_exact_match: float | None = None


class RoundPrivacy(_Record):
    """Client-level differential privacy in a round: the budget spent so far and the mechanism.
    A skipped round (too few sites drawn) has the epsilon alone."""

    epsilon: float
    delta: float | None = None
    noise_multiplier: float | None = None
    clip: float | None = None
    sampling_rate: float | None = None
    noise: str | None = None


class SecureRound(_Record):
    """Secure aggregation (SecAgg+) in a round: who took part at each stage, and the quantization."""

    secure: bool = True
    threshold: int
    neighbours: int | None = None
    sites_per_stage: list[int]  # [asked, advertised keys, shared keys, uploaded, consistency, unmasked]
    dropped: dict[str, list[str]] = {}  # stage -> the sites lost at it
    summed_weight: float | None = None
    reported_weight: float | None = None
    weight_cap: float | None = None
    identity_keys: str | None = None
    clip: float | None = None
    clipped_values: int
    quantization_error_bound: float
    upload_bytes_per_param: float
    stage_seconds: dict[str, float] = {}
    refused_by_coordinator: dict[str, str] | None = None  # site -> why the coordinator dropped it


class Rejected(_Record):
    site: str
    reason: str


class RoundRecord(_Record):
    """One round. Round 0 evaluates the base model (``sites``, ``aggregate``, ``seconds``); a
    training round adds what was aggregated; a skipped DP round has ``skipped`` and ``privacy``."""

    round: int
    sites: dict[str, SiteRound] = {}
    aggregate: Scores = Scores()
    seconds: float | None = None  # the round's wall time, training and evaluation
    skipped: str | None = None
    # Training rounds
    rejected: list[Rejected] = []
    accepted: int | None = None
    applied: bool | None = None
    update_norm: float | None = None
    server_lr: float | None = None  # the server learning rate the round's update was applied with
    trainable_tensors: int | None = None
    trainable_params: int | None = None  # what trained this round (layer-wise control changes it)
    update_bytes: int | None = None  # the most one site sent
    train_seconds: float | None = None
    aggregation_error: float | None = None  # LoRA: the new B·A against the mean of the sites' B·A
    aggregation_error_rel: float | None = None
    clipped_updates: int | None = None
    privacy: RoundPrivacy | None = None
    secure_aggregation: SecureRound | None = None
    layer_change: dict[str, float] | None = None  # layer label -> L2 norm of the global change

    @property
    def trained(self) -> bool:
        """A round that trained (not round 0, not a skipped round)."""
        return self.round > 0 and self.seconds is not None and self.skipped is None


# ----------------------------------------------------------------------------------------- the run


class MethodInfo(_Record):
    """metrics.json's ``fedtune``: what was trained and how it was aggregated."""

    peft: str  # the fine-tuning method (common.config's peft.method)
    artifact: Literal["adapter", "model"] = "adapter"  # model: full fine-tuning's model folder
    strategy: str
    aggregator: str = "mean"
    secure_aggregation: bool = False
    differential_privacy: bool = False
    update: Literal["delta"] = "delta"


class Best(_Record):
    """The best round by the federated validation metric (round 0, the base model, included)."""

    round: int
    metric: str
    value: float
    rounds_since: int


class GeneralScores(_Record):
    """The general-knowledge set (common.forgetting) scored on one model."""

    text_loss: float
    qa_loss: float
    qa_accuracy: float
    qa_wrong_loss: float | None = None  # a wrong answer of the same form (records before it have none)
    qa_reply_words: float | None = None  # the greedy replies' mean length in words


class Forgetting(_Record):
    """eval.forgetting: the base model and the final adapter on the general-knowledge set."""

    base: GeneralScores | None = None
    final: GeneralScores | None = None
    change: GeneralScores | None = None  # final - base


class RunRecord(_Record):
    """metrics.json."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fedtune: MethodInfo
    stopped: str | None = None  # why the run stopped early
    best: Best | None = None
    forgetting: Forgetting | None = None
    model: str
    trainable_params: int
    n_layers: int = 0
    config: dict[str, Any]  # FedTuneConfig.model_dump(mode="json")
    rounds: list[RoundRecord]
    elapsed_s: float  # the run's wall time (all its sessions, resumed ones too); when finished, fixed then
    finished: bool = False  # the run reached its end (its last round, or stopped early): nothing left to resume
    baselines: dict[str, Any] | None = None  # ftsim --baselines (simulations.baselines.BaselinesRecord)

    def site_names(self) -> list[str]:
        """Every site that appears in any round, sorted."""
        return sorted({n for r in self.rounds for n in r.sites})

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """One value of the run's config (``setting("privacy", "clip")``), or ``default``."""
        part = self.config.get(section)
        return part.get(key, default) if isinstance(part, dict) else default


# -------------------------------------------------------------------------------------- read/write


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(the document)"


def _explain(e: ValidationError, source: str) -> RecordError:
    problems = [
        f"{_where(err['loc'])}: {err['msg']}"
        + (f" (got {type(err['input']).__name__})" if err["type"] != "missing" else "")
        for err in e.errors(include_url=False)
    ]
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return RecordError(f"{source}: not a valid run record: " + "; ".join(problems[:5]) + more)


def _version(doc: dict, source: str) -> int | None:
    """The document's schema_version; None where it has none (an earlier release's record)."""
    if "schema_version" not in doc:
        return None
    v = doc["schema_version"]
    if v is None or v not in READABLE_VERSIONS or isinstance(v, bool) or not isinstance(v, int):
        raise RecordError(
            f"{source}: schema_version {v!r}: this fedtune reads run records of schema_version {SCHEMA_VERSION} "
            "(and the unversioned records of earlier releases); a newer record needs a newer fedtune"
        )
    return v


def validate_record(doc: dict | RunRecord, source: str = FILE) -> RunRecord:
    """A metrics document (as json.loads gives it, or as the coordinator builds it) as a
    :class:`RunRecord`; an unversioned one (earlier releases) is read as version 1. Raises
    :class:`RecordError` naming the key that is wrong, or the version that is not read."""
    if isinstance(doc, RunRecord):
        return doc
    if not isinstance(doc, dict):
        raise RecordError(f"{source}: not a valid run record: a JSON object was expected, not {type(doc).__name__}")
    if _version(doc, source) is None:  # migrate: version 1 is the unversioned shape, versioned
        doc = {"schema_version": SCHEMA_VERSION, **doc}
    try:
        return RunRecord.model_validate(doc)
    except ValidationError as e:
        raise _explain(e, source) from None


def write_record(path: Path, doc: dict | RunRecord) -> None:
    """Validate ``doc`` (the coordinator's metrics document) against :class:`RunRecord`, then write
    it atomically to ``path`` as the same JSON it is (key order and all), with ``schema_version``
    first. Raises :class:`RecordError` (nothing written) when it does not match the schema.
    A :class:`RunRecord` is written as the fields it holds (``model_dump(exclude_unset=True)``)."""
    if isinstance(doc, RunRecord):
        doc = doc.model_dump(mode="json", exclude_unset=True)
    if doc.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {doc.get('schema_version')!r}: this fedtune writes {SCHEMA_VERSION}")
    doc = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in doc.items() if k != "schema_version"}}
    validate_record(doc, str(path))
    atomic_write_json(path, doc)


def read_record(path: Path) -> RunRecord:
    """``path`` (a run's metrics.json) as a :class:`RunRecord`. Raises :class:`RecordError` when it
    cannot be read, is not JSON, does not match the schema (naming the key), or is of a version
    this fedtune does not read; the message starts with the path."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecordError(f"{path}: cannot read the run record: {e.strerror or e}") from None
    except ValueError as e:
        raise RecordError(f"{path}: the run record is not JSON: {e}") from None
    return validate_record(doc, str(path))


def read_document(path: Path) -> dict:
    """``path`` validated as :func:`read_record` does, returned as the plain JSON document (the
    form a caller that adds a section and writes it back with :func:`write_record` wants)."""
    record = read_record(path)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return {"schema_version": record.schema_version, **{k: v for k, v in doc.items() if k != "schema_version"}}


def finished_note(record: RunRecord, out: Path, rounds: int) -> str | None:
    """What ``--resume OUT`` says and does nothing else for, when the run is finished and
    ``rounds`` (federation.rounds as resumed, --rounds included) does not extend it; else None."""
    if not record.finished:
        return None
    saved = record.setting("federation", "rounds", 0)
    if rounds > saved:
        return None
    done = record.rounds[-1].round if record.rounds else 0
    how = f"stopped early after round {done}: {record.stopped}" if record.stopped else f"{done} of {saved} rounds run"
    return (
        f"{out} is finished ({how}; {record.elapsed_s:.0f} s); its report: {out / 'report.md'}. "
        f"Nothing to resume: add --rounds N (N > {saved}) to extend it"
    )
