"""Every message the coordinator and a site exchange, and a site's node config, as typed classes.

One module owns the wire: the record names, the key names, the type and the size of every value,
and the fixed set of metrics a site may report. Each class has ``to_record()`` (what the sender
puts into a Flower message) and ``from_record()`` (what the receiver reads back); a reader refuses
an unknown key, a missing one, a value of the wrong type or an oversized one with a
:class:`MessageError` that names the key and says what was expected. Both sides are the same
version of fedtune: nothing here negotiates.

Coordinator -> site (TRAIN, EVALUATE)::

    RecordDict {"arrays" + "adapter-layout": the global adapter (one float32 vector, names and
                shapes beside it: fedtune.common.adapters.adapter_records),
                "config": ConfigRecord {"fedtune-config": the run's config as JSON, stripped of
                          what only the coordinator needs (:func:`site_config`), "server-round",
                          TRAIN: "trainable" (the tensors this round trains), under DP
                          "dp-population" (the sites the round was drawn from)},
                secure TRAIN: "secagg": the shares sealed to this site (:class:`SecureTrainRequest`)}

Site -> coordinator::

    RecordDict {"metrics": MetricRecord (:class:`TrainMetrics` / :class:`EvalMetrics`: a fixed set),
                "site": ConfigRecord {"name", "status", "reason" (why no update)},
                TRAIN: "arrays" + "adapter-layout" (the delta of the trainable tensors) or, secure,
                "masked" (the masked uint32 vector)}

A secure round adds four stages (train.advertise, train.share_keys, train.consistency,
train.unmask; the protocol is in :mod:`fedtune.common.secagg.protocol`): each request is
``{"secagg": <Stage>Request}`` (advertise also carries the round's "config") and each reply
``{"metrics": {}, "site": ..., "secagg": <Stage>Reply}``.

A site's own settings (never sent) are its Flower node config: :class:`NodeConfig`.

The coordinator's tolerant readers (:mod:`fedtune.server.messaging`: a hostile site's reply is
recorded, cleaned, not raised on) use the same declarations (:data:`TRAIN_METRICS`,
:data:`EVAL_METRICS`, :data:`SITE_STATUSES`, :func:`metric_value`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from . import adapters
from .config import FedTuneConfig
from .secagg import protocol as secagg_protocol

# ---------------------------------------------------------------------------------------------
# Names on the wire

CONFIG = "config"  # record: the round's config (ConfigRecord)
METRICS = "metrics"  # record: a site's metrics (MetricRecord)
SITE = "site"  # record: a site's name, status and reason (ConfigRecord)
ARRAYS = "arrays"  # record: an adapter or a delta (ArrayRecord, one vector "flat")
LAYOUT = adapters.LAYOUT_KEY  # record: the names and shapes of ARRAYS
SECAGG = secagg_protocol.RECORD  # record: a secure stage's request or reply
MASKED = secagg_protocol.MASKED  # record: a secure round's masked upload

CONFIG_KEY = "fedtune-config"
ROUND_KEY = "server-round"
TRAINABLE_KEY = "trainable"
ROUND_TAG_KEY = "round-tag"  # in every secure stage's request: the round it is for
# Under differential privacy (TRAIN): how many sites the round was drawn from. With the config it
# fixes the sampling rate, hence the noise multiplier every site adds its share of.
DP_POPULATION_KEY = "dp-population"

TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
ADVERTISE = secagg_protocol.ADVERTISE
SHARE_KEYS = secagg_protocol.SHARE_KEYS
CONSISTENCY = secagg_protocol.CONSISTENCY
UNMASK = secagg_protocol.UNMASK
STAGES = secagg_protocol.STAGES

# Sizes: what a reader accepts at most (a peer may be an attacker; none of these is near what an
# honest peer sends).
MAX_CONFIG_CHARS = 1 << 22  # the config's JSON (a few KB once stripped)
MAX_NAME_CHARS = 256  # a site's name as sent (the coordinator records at most 64 of it)
MAX_REASON_CHARS = 2000  # a site's reason as sent (the coordinator records at most 300 of it)
MAX_TENSOR_NAME_CHARS = 1024
MAX_TENSORS = 1 << 20
MAX_SITES = 1 << 16  # entries of a list of sites (neighbours, alive sets, shares)
MAX_KEY_BYTES = 4096  # one public key, signature or sealed share
MAX_NODE_CHARS = 32  # a Flower node id as text
MAX_PATH_CHARS = 4096  # a path in the node config


class MessageError(ValueError):
    """A record that is not the message it should be: names the record and the key, and what was expected."""


# ---------------------------------------------------------------------------------------------
# Keys: one declaration per record, one checker for all


@dataclass(frozen=True)
class Key:
    """One key of a record: its name on the wire, its kind and the most it may hold.

    Kinds: ``int`` (a whole number, not a bool), ``float`` (any number), ``bool``, ``str``,
    ``bytes``, ``ints``/``strs``/``bytes-list`` (lists of those). ``size``: characters of a
    str, bytes of a bytes value, entries of a list; ``item``: the size of each list entry."""

    wire: str
    kind: str
    required: bool = True
    size: int | None = None
    item: int | None = None


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "bytes": bytes}
_LISTS = {"ints": int, "strs": str, "bytes-list": bytes}


def _expected(key: Key) -> str:
    what = {
        "int": "a whole number",
        "float": "a number",
        "bool": "true or false",
        "str": "text",
        "bytes": "bytes",
        "ints": "a list of whole numbers",
        "strs": "a list of text",
        "bytes-list": "a list of bytes",
    }[key.kind]
    if key.size is not None:
        unit = "characters" if key.kind == "str" else "bytes" if key.kind == "bytes" else "entries"
        what += f" of at most {key.size:,} {unit}"
    return what


def _is(value: object, kind: type) -> bool:
    if kind is int:  # numpy's integers too (a sender's); never a bool
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    return isinstance(value, kind)


def _plain(value: object, kind: type) -> object:
    """As a ConfigRecord holds it: Python's int, float and bool."""
    return kind(value) if kind in (int, float, bool) else value


def check_value(what: str, key: Key, value: object) -> object:
    """``value`` as ``key`` declares it (a float for a float key, a list for a list key), or MessageError."""
    bad = MessageError(f"{what}: key {key.wire!r}: expected {_expected(key)}, got {_shown(value)}")
    if key.kind in _SCALARS:
        kind = _SCALARS[key.kind]
        if not _is(value, kind):
            raise bad
        if key.size is not None and len(value) > key.size:  # type: ignore[arg-type]
            raise bad
        return _plain(value, kind)
    kind = _LISTS[key.kind]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise bad
    if key.size is not None and len(value) > key.size:
        raise bad
    for v in value:
        if not _is(v, kind) or (key.item is not None and len(v) > key.item):
            item = f" of at most {key.item:,} {'characters' if kind is str else 'bytes'}" if key.item else ""
            raise MessageError(
                f"{what}: key {key.wire!r}: expected {_expected(key)}, each {kind.__name__}{item}; got an entry {_shown(v)}"
            )
    return [_plain(v, kind) for v in value]


def _shown(value: object) -> str:
    """A short description of what a peer sent (never its full content)."""
    if isinstance(value, (str, bytes, list, tuple)):
        return f"{type(value).__name__} of length {len(value):,}"
    if isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value!r}"[:60]
    return type(value).__name__


def read_keys(what: str, record: object, keys: tuple[Key, ...]) -> dict[str, object]:
    """The values of ``record`` (a ConfigRecord) by wire key, each checked against ``keys``:
    unknown, missing, mistyped or oversized -> MessageError naming the key."""
    if not isinstance(record, (ConfigRecord, Mapping)):
        raise MessageError(f"{what}: expected a ConfigRecord, got {type(record).__name__}")
    try:
        items = list(record.items())
    except (AttributeError, TypeError) as e:
        raise MessageError(f"{what}: unreadable record ({type(e).__name__})") from None
    known = {k.wire: k for k in keys}
    unknown = [k for k, _ in items if k not in known]
    if unknown:
        raise MessageError(
            f"{what}: unknown key {str(unknown[0])[:64]!r} (expected {', '.join(repr(k) for k in known) or 'no keys'})"
        )
    values = dict(items)
    out = {}
    for k in keys:
        if k.wire not in values:
            if k.required:
                raise MessageError(f"{what}: missing key {k.wire!r} ({_expected(k)})")
            continue
        out[k.wire] = check_value(what, k, values[k.wire])
    return out


class _Record:
    """A dataclass whose fields are the keys of one ConfigRecord (``metadata["key"]``: its :class:`Key`)."""

    WHAT: ClassVar[str] = "record"

    @classmethod
    def keys(cls) -> tuple[Key, ...]:
        return tuple(f.metadata["key"] for f in dataclasses.fields(cls) if "key" in f.metadata)  # type: ignore[arg-type]

    def to_record(self) -> ConfigRecord:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f.metadata.get("key")
            value = getattr(self, f.name)
            if key is None or value is None:
                continue
            out[key.wire] = check_value(self.WHAT, key, value)  # the sender is held to the same rules
        return ConfigRecord(out)

    @classmethod
    def from_record(cls, record: object):
        values = read_keys(cls.WHAT, record, cls.keys())
        by_wire = {f.metadata["key"].wire: f.name for f in dataclasses.fields(cls) if "key" in f.metadata}  # type: ignore[arg-type]
        return cls(**{by_wire[k]: v for k, v in values.items()})


def _key(wire: str, kind: str, *, required: bool = True, size: int | None = None, item: int | None = None, **kw):
    return field(metadata={"key": Key(wire, kind, required, size, item)}, **kw)


def _opt(wire: str, kind: str, *, size: int | None = None, item: int | None = None):
    return _key(wire, kind, required=False, size=size, item=item, default=None)


# ---------------------------------------------------------------------------------------------
# The config a site gets

_CONFIG_CACHE: OrderedDict[bytes, FedTuneConfig] = OrderedDict()
_CONFIG_CACHE_SIZE = 8


def site_config(cfg: FedTuneConfig) -> FedTuneConfig:
    """``cfg`` as it travels to a site: without what only the coordinator needs, i.e. the site
    table (``federation.sites``: every site's name, data paths and rank), the coordinator's
    output folder (``output.dir``) and the study settings of ``ftsim tune`` (``tune``: its storage
    URL may hold a database password). Not re-validated (nothing it drops makes a config
    invalid); the site side works with it as it is."""
    return cfg.model_copy(
        update={
            "federation": cfg.federation.model_copy(update={"sites": []}),
            "output": cfg.output.model_copy(update={"dir": None}),
            "tune": type(cfg.tune)(),
        }
    )


def config_from_json(text: str) -> FedTuneConfig:
    """The run's config from its JSON, validated once per distinct text (the same config comes
    with every message; a new one is validated in full). MessageError when it does not validate.
    The result is shared between callers: copy it (``model_copy``) before changing it."""
    if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
        raise MessageError(
            f"round config: key {CONFIG_KEY!r}: expected the config as JSON of at most {MAX_CONFIG_CHARS:,} characters, "
            f"got {_shown(text)}"
        )
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    cfg = _CONFIG_CACHE.get(digest)
    if cfg is not None:
        _CONFIG_CACHE.move_to_end(digest)
        return cfg
    try:
        cfg = FedTuneConfig.model_validate(json.loads(text))
    except ValueError as e:  # json's and pydantic's errors are both ValueErrors
        first = str(e).splitlines()[:3]
        raise MessageError(f"round config: key {CONFIG_KEY!r}: not a valid fedtune config: {' '.join(first)}") from None
    _CONFIG_CACHE[digest] = cfg
    while len(_CONFIG_CACHE) > _CONFIG_CACHE_SIZE:
        _CONFIG_CACHE.popitem(last=False)
    return cfg


# ---------------------------------------------------------------------------------------------
# Coordinator -> site: the round's config, the train task, the eval task


_ROUND_KEYS = (
    Key(CONFIG_KEY, "str", size=MAX_CONFIG_CHARS),
    Key(ROUND_KEY, "int"),
    Key(TRAINABLE_KEY, "strs", required=False, size=MAX_TENSORS, item=MAX_TENSOR_NAME_CHARS),
    Key(DP_POPULATION_KEY, "int", required=False),
)


@dataclass(frozen=True)
class RoundConfig:
    """The ``config`` record of a TRAIN or EVALUATE message (and of key advertisement).

    ``config``: the run's config; :meth:`to_record` sends :func:`site_config` of it, so no
    site's paths travel. ``trainable``: the tensors this round trains (TRAIN only; every update
    must have exactly these). ``dp_population``: under DP, the sites the round was drawn from."""

    config: FedTuneConfig
    server_round: int
    trainable: list[str] | None = None
    dp_population: int | None = None

    WHAT: ClassVar[str] = "round config"

    def to_record(self) -> ConfigRecord:
        values = {CONFIG_KEY: site_config(self.config).to_json(), ROUND_KEY: int(self.server_round)}
        if self.trainable is not None:
            values[TRAINABLE_KEY] = list(self.trainable)
        if self.dp_population is not None:
            values[DP_POPULATION_KEY] = int(self.dp_population)
        return ConfigRecord(
            {k.wire: check_value(self.WHAT, k, values[k.wire]) for k in _ROUND_KEYS if k.wire in values}
        )

    @classmethod
    def from_record(cls, record: object) -> RoundConfig:
        v = read_keys(cls.WHAT, record, _ROUND_KEYS)
        if v[ROUND_KEY] < 0:
            raise MessageError(f"{cls.WHAT}: key {ROUND_KEY!r}: expected a round number >= 0, got {v[ROUND_KEY]}")
        if DP_POPULATION_KEY in v and v[DP_POPULATION_KEY] < 0:
            raise MessageError(f"{cls.WHAT}: key {DP_POPULATION_KEY!r}: expected a number of sites >= 0")
        return cls(
            config_from_json(v[CONFIG_KEY]),  # type: ignore[arg-type]
            v[ROUND_KEY],  # type: ignore[arg-type]
            v.get(TRAINABLE_KEY),  # type: ignore[arg-type]
            v.get(DP_POPULATION_KEY),  # type: ignore[arg-type]
        )


def _read_content(what: str, content: object, allowed: set[str], required: set[str]) -> None:
    try:
        names = set(content.keys())  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise MessageError(f"{what}: expected a RecordDict, got {type(content).__name__}") from None
    unknown = sorted(str(n)[:64] for n in names - allowed)
    if unknown:
        raise MessageError(f"{what}: unknown record {unknown[0]!r} (expected {', '.join(sorted(allowed))})")
    missing = sorted(required - names)
    if missing:
        raise MessageError(f"{what}: missing record {missing[0]!r}")


def _tensors(state: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Torch tensors as they are, numpy arrays as float32 tensors (for adapters.adapter_records)."""
    return OrderedDict(
        (k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))
        for k, v in state.items()
    )


def _read_adapter(what: str, content, **limits) -> OrderedDict[str, np.ndarray]:
    try:
        return adapters.read_adapter(content, **limits)
    except ValueError as e:
        raise MessageError(f"{what}: {e}") from None


@dataclass(frozen=True)
class TrainTask:
    """A TRAIN message: the global adapter, the round's config and (secure rounds) the shares
    sealed to this site. ``adapter``: tensor name -> array (torch tensors or numpy arrays; what
    :meth:`from_record` returns is numpy, as sent)."""

    round: RoundConfig
    adapter: Mapping[str, Any]
    secure: SecureTrainRequest | None = None

    WHAT: ClassVar[str] = "train task"

    @property
    def config(self) -> FedTuneConfig:
        return self.round.config

    @property
    def server_round(self) -> int:
        return self.round.server_round

    @property
    def trainable(self) -> list[str]:
        return list(self.round.trainable or [])

    def to_record(self) -> RecordDict:
        if self.round.trainable is None:
            raise MessageError(f"{self.WHAT}: key {TRAINABLE_KEY!r}: a train task names the tensors that train")
        records = {**adapters.adapter_records(_tensors(self.adapter)), CONFIG: self.round.to_record()}
        if self.secure is not None:
            records[SECAGG] = self.secure.to_record()
        return RecordDict(records)

    @classmethod
    def from_record(cls, content) -> TrainTask:
        _read_content(cls.WHAT, content, {ARRAYS, LAYOUT, CONFIG, SECAGG}, {ARRAYS, LAYOUT, CONFIG})
        rc = RoundConfig.from_record(content[CONFIG])
        if rc.trainable is None:
            raise MessageError(f"{cls.WHAT}: round config: missing key {TRAINABLE_KEY!r} (the tensors that train)")
        secure = SecureTrainRequest.from_record(content[SECAGG]) if SECAGG in content else None
        return cls(rc, _read_adapter(cls.WHAT, content), secure)


@dataclass(frozen=True)
class EvalTask:
    """An EVALUATE message: the global adapter and the round's config."""

    round: RoundConfig
    adapter: Mapping[str, Any]

    WHAT: ClassVar[str] = "eval task"

    @property
    def config(self) -> FedTuneConfig:
        return self.round.config

    @property
    def server_round(self) -> int:
        return self.round.server_round

    def to_record(self) -> RecordDict:
        return RecordDict({**adapters.adapter_records(_tensors(self.adapter)), CONFIG: self.round.to_record()})

    @classmethod
    def from_record(cls, content) -> EvalTask:
        _read_content(cls.WHAT, content, {ARRAYS, LAYOUT, CONFIG}, {ARRAYS, LAYOUT, CONFIG})
        return cls(RoundConfig.from_record(content[CONFIG]), _read_adapter(cls.WHAT, content))


# ---------------------------------------------------------------------------------------------
# Site -> coordinator: metrics (a fixed set), the site record, the replies

# Statuses a site may report; the coordinator adds error, unknown, invalid, rejected.
SITE_STATUSES = frozenset({"ok", "refused", "data-error", "no-usable-examples", "no-eval-examples"})


@dataclass(frozen=True)
class SiteStatus(_Record):
    """The ``site`` record of every reply: who answers, and whether (else why not) it has a result."""

    name: str = _key("name", "str", size=MAX_NAME_CHARS)
    status: str = _key("status", "str", size=32)
    reason: str | None = _opt("reason", "str", size=MAX_REASON_CHARS)

    WHAT: ClassVar[str] = "site record"

    def to_record(self) -> ConfigRecord:
        self._check_status()
        return super().to_record()

    @classmethod
    def from_record(cls, record: object) -> SiteStatus:
        out = super().from_record(record)
        out._check_status()
        return out

    def _check_status(self) -> None:
        if self.status not in SITE_STATUSES:
            raise MessageError(
                f"{self.WHAT}: key 'status': expected one of {', '.join(sorted(SITE_STATUSES))}, got {_shown(self.status)}"
            )

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _metric(kind: type, lo: float = -math.inf, hi: float = math.inf):
    return field(default=None, metadata={"metric": (kind, lo, hi)})


def metric_expected(spec: tuple) -> str:
    kind, lo, hi = spec
    what = "a whole number" if kind is int else "a number"
    if (lo, hi) != (-math.inf, math.inf):
        what += f" in [{lo:g}, {hi:g}]"
    return what


def metric_value(value: object, spec: tuple) -> int | float | None:
    """``value`` as the metric ``spec`` = (int or float, low, high) declares it, or None when it
    is not: int (a whole number; a float that is one is taken), float (any number; NaN is kept
    for the readers to judge, e.g. a diverged site's loss), within [low, high]."""
    kind, lo, hi = spec
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):  # numpy's numbers too
        return None
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        value = int(value)
        if not -(2**63) <= value < 2**63:
            return None
    else:
        value = float(value)
    if not math.isnan(value) and not lo <= value <= hi:
        return None
    return value


class _Metrics:
    """A fixed set of metrics: each field is one MetricRecord key (``num_examples`` travels as
    ``num-examples``); None = not reported."""

    WHAT: ClassVar[str] = "metrics"

    @classmethod
    def schema(cls) -> dict[str, tuple]:
        """wire key -> (int or float, low, high)."""
        return {f.name.replace("_", "-"): f.metadata["metric"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def to_record(self) -> MetricRecord:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            typed = metric_value(value, f.metadata["metric"])
            if typed is None:
                raise MessageError(
                    f"{self.WHAT}: key {f.name.replace('_', '-')!r}: expected {metric_expected(f.metadata['metric'])}, "
                    f"got {_shown(value)}"
                )
            out[f.name.replace("_", "-")] = typed
        return MetricRecord(out)

    def to_dict(self) -> dict[str, int | float]:
        """The reported metrics by wire key."""
        return dict(self.to_record().items())

    @classmethod
    def read(cls, record: object, strict: bool = True):
        """-> (metrics, how many keys were dropped). ``strict``: an unknown key or a value of the
        wrong type or range is a MessageError naming it; else it is dropped and counted."""
        if record is None:
            items: list = []
        else:
            try:
                items = list(record.items())  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                if strict:
                    raise MessageError(f"{cls.WHAT}: expected a MetricRecord, got {type(record).__name__}") from None
                return cls(), 1
        schema = cls.schema()
        out: dict[str, object] = {}
        dropped = 0
        for k, v in items:
            spec = schema.get(k) if isinstance(k, str) else None
            value = metric_value(v, spec) if spec is not None else None
            if value is None:
                if strict:
                    if spec is None:
                        raise MessageError(
                            f"{cls.WHAT}: unknown key {str(k)[:64]!r} (a site reports only: {', '.join(schema)})"
                        )
                    raise MessageError(f"{cls.WHAT}: key {k!r}: expected {metric_expected(spec)}, got {_shown(v)}")
                dropped += 1
            else:
                out[k.replace("-", "_")] = value
        return cls(**out), dropped

    @classmethod
    def from_record(cls, record: object):
        return cls.read(record, strict=True)[0]


@dataclass(frozen=True)
class TrainMetrics(_Metrics):
    """What a site may report of a training round (and nothing else)."""

    num_examples: int | None = _metric(int)  # examples trained on (0 with no update)
    records: int | None = _metric(int)  # records read from its file
    invalid_records: int | None = _metric(int)
    dropped_too_long: int | None = _metric(int)
    train_loss: float | None = _metric(float)  # mean over the round's steps
    train_loss_first: float | None = _metric(float)
    train_loss_last: float | None = _metric(float)
    train_steps: int | None = _metric(int)
    train_seconds: float | None = _metric(float)
    train_tokens: int | None = _metric(int)
    receive_seconds: float | None = _metric(float)  # task known -> message in memory (the download)
    startup_seconds: float | None = _metric(float)  # message in memory -> first training step
    lora_rank: int | None = _metric(int, 1, 1 << 20)  # a lower-rank site's rank (HetLoRA)
    update_norm: float | None = _metric(float)  # the update's L2 norm before clipping
    update_clipped: int | None = _metric(int, 0, 1)
    update_nonfinite: int | None = _metric(int, 0, 1)  # an older site zeroed a diverged update
    planned_steps: int | None = _metric(int)  # local early stopping (train.local_patience)
    local_stopped_at: int | None = _metric(int)
    local_best_step: int | None = _metric(int)
    local_val_start: float | None = _metric(float)
    local_val_best: float | None = _metric(float)
    upload_bytes: int | None = _metric(int)
    clipped_values: int | None = _metric(int)  # secure rounds: values the quantizer clipped
    secagg_weight: int | None = _metric(int)  # secure rounds: the weight the site says it encoded

    WHAT: ClassVar[str] = "train metrics"


@dataclass(frozen=True)
class EvalMetrics(_Metrics):
    """What a site may report of an evaluation."""

    num_examples: int | None = _metric(int)
    eval_loss: float | None = _metric(float, 0.0, math.inf)
    exact_match: float | None = _metric(float, 0.0, 1.0)
    answer_tokens: int | None = _metric(int)
    # federation.personalization: the site's personalized model on the same examples (scores only;
    # the private part never leaves the site), and the private steps it trained this round.
    personal_eval_loss: float | None = _metric(float, 0.0, math.inf)
    personal_exact_match: float | None = _metric(float, 0.0, 1.0)
    personal_steps: int | None = _metric(int, 0)

    WHAT: ClassVar[str] = "eval metrics"


# The declarations the coordinator's tolerant readers use (wire key -> (kind, low, high)).
TRAIN_METRICS: dict[str, tuple] = TrainMetrics.schema()
EVAL_METRICS: dict[str, tuple] = EvalMetrics.schema()


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to TRAIN: its status, its metrics, and (status ok) its update: the delta
    of the trainable tensors (``update``: name -> tensor/array) or, in a secure round, the masked
    uint32 vector (``masked``). :meth:`to_record` fills ``upload_bytes`` when not given."""

    site: SiteStatus
    metrics: TrainMetrics = field(default_factory=TrainMetrics)
    update: Mapping[str, Any] | None = None
    masked: np.ndarray | None = None
    update_bytes: int | None = None  # read: the bytes of the update's arrays as received
    metrics_dropped: int = 0  # read with strict=False: metric keys dropped

    WHAT: ClassVar[str] = "train reply"

    def to_record(self) -> RecordDict:
        if self.update is not None and self.masked is not None:
            raise MessageError(f"{self.WHAT}: an update or a masked vector, not both")
        records: dict = {}
        if self.update is not None:
            records = adapters.adapter_records(_tensors(self.update))
            nbytes = adapters.record_nbytes(records[ARRAYS])
        elif self.masked is not None:
            records = {MASKED: secagg_protocol.masked_record(self.masked)}
            nbytes = 4 * int(np.asarray(self.masked).size)
        metrics = self.metrics
        if records and metrics.upload_bytes is None:
            metrics = dataclasses.replace(metrics, upload_bytes=nbytes)
        return RecordDict({METRICS: metrics.to_record(), SITE: self.site.to_record(), **records})

    @classmethod
    def from_record(
        cls,
        content,
        *,
        max_values: int | None = None,
        max_tensors: int | None = None,
        masked_length: int | None = None,
        strict: bool = True,
    ) -> TrainReply:
        """``max_values``/``max_tensors``: the most a plain update may hold (refused unread
        beyond); ``masked_length``: the length a masked vector must have (secure rounds).
        ``strict`` False: unknown or mistyped metrics are dropped (counted in
        ``metrics_dropped``) instead of refusing the reply."""
        _read_content(cls.WHAT, content, {METRICS, SITE, ARRAYS, LAYOUT, MASKED}, {METRICS, SITE})
        site = SiteStatus.from_record(content[SITE])
        metrics, dropped = TrainMetrics.read(content[METRICS], strict=strict)
        update = masked = nbytes = None
        if MASKED in content:
            if ARRAYS in content or LAYOUT in content:
                raise MessageError(f"{cls.WHAT}: records 'arrays' and 'masked': an update or a masked vector, not both")
            if masked_length is None:
                raise MessageError(f"{cls.WHAT}: record 'masked': not a secure round")
            try:
                masked = secagg_protocol.read_masked(content, masked_length)
            except (ValueError, AttributeError, TypeError) as e:
                raise MessageError(f"{cls.WHAT}: record 'masked': {e}") from None
            nbytes = len(content[MASKED]["y"].data)
        elif ARRAYS in content or LAYOUT in content:
            update = _read_adapter(cls.WHAT, content, max_values=max_values, max_tensors=max_tensors)
            nbytes = adapters.record_nbytes(content[ARRAYS])
        if (update is not None or masked is not None) and not site.ok:
            raise MessageError(f"{cls.WHAT}: status {site.status!r} with an update (only 'ok' carries one)")
        return cls(site, metrics, update, masked, nbytes, dropped)


@dataclass(frozen=True)
class EvalReply:
    """A site's answer to EVALUATE: its status and metrics."""

    site: SiteStatus
    metrics: EvalMetrics = field(default_factory=EvalMetrics)
    metrics_dropped: int = 0

    WHAT: ClassVar[str] = "eval reply"

    def to_record(self) -> RecordDict:
        return RecordDict({METRICS: self.metrics.to_record(), SITE: self.site.to_record()})

    @classmethod
    def from_record(cls, content, *, strict: bool = True) -> EvalReply:
        _read_content(cls.WHAT, content, {METRICS, SITE}, {METRICS, SITE})
        metrics, dropped = EvalMetrics.read(content[METRICS], strict=strict)
        return cls(SiteStatus.from_record(content[SITE]), metrics, dropped)


# ---------------------------------------------------------------------------------------------
# Secure aggregation: each stage's request (coordinator -> site) and reply (site -> coordinator).
# Semantic checks (ranges, distinct sites, signatures) are the protocol's (client/secure.py,
# server/secure.py); here: keys, types and sizes.

_TAG = dict(size=secagg_protocol.TAG_BYTES)
_SITES = dict(size=MAX_SITES)
_KEYS = dict(size=MAX_SITES, item=MAX_KEY_BYTES)


@dataclass(frozen=True)
class AdvertiseRequest(_Record):
    """Stage 1 (train.advertise): this site's number in the round and the quantization settings."""

    round_tag: bytes = _key(ROUND_TAG_KEY, "bytes", **_TAG)
    sid: int = _key("sid", "int")
    n_sites: int = _key("n-sites", "int")
    clip: float = _key("clip", "float")
    max_weight: int = _key("max-weight", "int")

    WHAT: ClassVar[str] = "train.advertise request"


@dataclass(frozen=True)
class AdvertiseReply(_Record):
    """Stage 1's answer: two X25519 public keys, signed; the identity key; the example count (weighting by examples)."""

    c_pub: bytes = _key("c-pub", "bytes", size=MAX_KEY_BYTES)
    s_pub: bytes = _key("s-pub", "bytes", size=MAX_KEY_BYTES)
    signer: bytes = _key("signer", "bytes", size=MAX_KEY_BYTES)
    sig: bytes = _key("sig", "bytes", size=MAX_KEY_BYTES)
    examples: int | None = _opt("examples", "int")

    WHAT: ClassVar[str] = "train.advertise reply"


@dataclass(frozen=True)
class ShareKeysRequest(_Record):
    """Stage 2 (train.share_keys): the neighbours, their signed keys, identity keys and Flower nodes."""

    round_tag: bytes = _key(ROUND_TAG_KEY, "bytes", **_TAG)
    threshold: int = _key("threshold", "int")
    weight_cap: int = _key("weight-cap", "int")
    nbr_ids: list[int] = _key("nbr-ids", "ints", **_SITES)
    nbr_c: list[bytes] = _key("nbr-c", "bytes-list", **_KEYS)
    nbr_s: list[bytes] = _key("nbr-s", "bytes-list", **_KEYS)
    nbr_sig: list[bytes] = _key("nbr-sig", "bytes-list", **_KEYS)
    nbr_pk: list[bytes] = _key("nbr-pk", "bytes-list", **_KEYS)
    nbr_node: list[str] = _key("nbr-node", "strs", size=MAX_SITES, item=MAX_NODE_CHARS)

    WHAT: ClassVar[str] = "train.share_keys request"

    @classmethod
    def build(cls, tag: bytes, threshold: int, cap: int, ids: list[int], keys, signed, node_of) -> ShareKeysRequest:
        """From the coordinator's tables: ``keys[j]`` = (c, s), ``signed[j]`` = (identity, signature), ``node_of[j]``."""
        return cls(
            tag,
            int(threshold),
            int(cap),
            [int(j) for j in ids],
            [keys[j][0] for j in ids],
            [keys[j][1] for j in ids],
            [signed[j][1] for j in ids],
            [signed[j][0] for j in ids],
            [str(node_of[j]) for j in ids],
        )


@dataclass(frozen=True)
class ShareKeysReply(_Record):
    """Stage 2's answer: the shares sealed to each neighbour."""

    to: list[int] = _key("to", "ints", **_SITES)
    sealed: list[bytes] = _key("sealed", "bytes-list", **_KEYS)

    WHAT: ClassVar[str] = "train.share_keys reply"


@dataclass(frozen=True)
class SecureTrainRequest(_Record):
    """Stage 3 (the TRAIN message's ``secagg`` record): the shares sealed to this site, by sender."""

    round_tag: bytes = _key(ROUND_TAG_KEY, "bytes", **_TAG)
    senders: list[int] = _key("from", "ints", **_SITES)
    sealed: list[bytes] = _key("sealed", "bytes-list", **_KEYS)

    WHAT: ClassVar[str] = "train secagg record"


@dataclass(frozen=True)
class ConsistencyRequest(_Record):
    """Stage 4 (train.consistency): the alive set U3 to sign."""

    round_tag: bytes = _key(ROUND_TAG_KEY, "bytes", **_TAG)
    alive: list[int] = _key("alive", "ints", **_SITES)

    WHAT: ClassVar[str] = "train.consistency request"


@dataclass(frozen=True)
class ConsistencyReply(_Record):
    """Stage 4's answer: the site's signature on the alive set."""

    sig: bytes = _key("sig", "bytes", size=MAX_KEY_BYTES)

    WHAT: ClassVar[str] = "train.consistency reply"


@dataclass(frozen=True)
class UnmaskRequest(_Record):
    """Stage 5 (train.unmask): U3, this site's view of it, and its share holders' signatures on U3."""

    round_tag: bytes = _key(ROUND_TAG_KEY, "bytes", **_TAG)
    u3: list[int] = _key("u3", "ints", **_SITES)
    alive: list[int] = _key("alive", "ints", **_SITES)
    dropped: list[int] = _key("dropped", "ints", **_SITES)
    sig_ids: list[int] = _key("sig-ids", "ints", **_SITES)
    sigs: list[bytes] = _key("sigs", "bytes-list", **_KEYS)

    WHAT: ClassVar[str] = "train.unmask request"


@dataclass(frozen=True)
class UnmaskReply(_Record):
    """Stage 5's answer: shares of alive sites' self-mask seeds and dropped sites' mask keys."""

    self_ids: list[int] = _key("self-ids", "ints", **_SITES)
    self_shares: list[bytes] = _key("self-shares", "bytes-list", **_KEYS)
    pair_ids: list[int] = _key("pair-ids", "ints", **_SITES)
    pair_shares: list[bytes] = _key("pair-shares", "bytes-list", **_KEYS)

    WHAT: ClassVar[str] = "train.unmask reply"

    def shares(self) -> dict[str, dict[int, int]]:
        """As :func:`fedtune.common.secagg.unmask_sum` takes them: {"self_seed": {sid: share}, "pair_key": {...}}."""
        if len(self.self_ids) != len(self.self_shares) or len(self.pair_ids) != len(self.pair_shares):
            raise MessageError(f"{self.WHAT}: ids and shares differ in length")
        return {
            "self_seed": dict(zip(self.self_ids, secagg_protocol.bytes_to_ints(self.self_shares))),
            "pair_key": dict(zip(self.pair_ids, secagg_protocol.bytes_to_ints(self.pair_shares))),
        }


# stage -> (request class, reply class)
STAGE_MESSAGES: dict[str, tuple[type, type]] = {
    ADVERTISE: (AdvertiseRequest, AdvertiseReply),
    SHARE_KEYS: (ShareKeysRequest, ShareKeysReply),
    CONSISTENCY: (ConsistencyRequest, ConsistencyReply),
    UNMASK: (UnmaskRequest, UnmaskReply),
}


@dataclass(frozen=True)
class StageTask:
    """A secure stage's message to one site: the stage's request, and (advertise) the round's config."""

    request: AdvertiseRequest | ShareKeysRequest | ConsistencyRequest | UnmaskRequest
    round: RoundConfig | None = None
    config_record: ConfigRecord | None = None  # the round's config record as it is (the coordinator forwards it)

    WHAT: ClassVar[str] = "secure stage task"

    def to_record(self) -> RecordDict:
        records = {SECAGG: self.request.to_record()}
        if self.round is not None:
            records[CONFIG] = self.round.to_record()
        elif self.config_record is not None:
            records[CONFIG] = self.config_record
        return RecordDict(records)

    @staticmethod
    def round_tag(content) -> object:
        """The round tag a stage task names, as sent, unchecked (None when it names none): read
        before the task itself, so that a site first checks that a task is for the round and the
        stage it is at, and refuses a task for another stage as that, not as a malformed one."""
        try:
            return content[SECAGG].get(ROUND_TAG_KEY) if SECAGG in content else None
        except (AttributeError, TypeError):
            return None

    @classmethod
    def from_record(cls, content, stage: str) -> StageTask:
        if stage not in STAGE_MESSAGES:
            raise MessageError(f"{cls.WHAT}: unknown stage {str(stage)[:64]!r} (expected {', '.join(STAGES)})")
        config = {CONFIG} if stage == ADVERTISE else set()
        _read_content(f"{stage} task", content, {SECAGG} | config, {SECAGG})
        request = STAGE_MESSAGES[stage][0].from_record(content[SECAGG])
        return cls(request, RoundConfig.from_record(content[CONFIG]) if CONFIG in content else None)


@dataclass(frozen=True)
class StageReply:
    """A site's answer at a secure stage: its status and (ok) the stage's reply."""

    site: SiteStatus
    reply: AdvertiseReply | ShareKeysReply | ConsistencyReply | UnmaskReply | None = None

    WHAT: ClassVar[str] = "secure stage reply"

    def to_record(self) -> RecordDict:
        records = {METRICS: MetricRecord({}), SITE: self.site.to_record()}
        if self.reply is not None:
            records[SECAGG] = self.reply.to_record()
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, stage: str) -> StageReply:
        if stage not in STAGE_MESSAGES:
            raise MessageError(f"{cls.WHAT}: unknown stage {str(stage)[:64]!r} (expected {', '.join(STAGES)})")
        what = f"{stage} reply"
        _read_content(what, content, {METRICS, SITE, SECAGG}, {SITE})
        if METRICS in content and len(list(content[METRICS].keys())):
            raise MessageError(f"{what}: record 'metrics': a secure stage reports no metrics")
        site = SiteStatus.from_record(content[SITE])
        if site.ok and SECAGG not in content:
            raise MessageError(f"{what}: status 'ok' without its 'secagg' record")
        reply = STAGE_MESSAGES[stage][1].from_record(content[SECAGG]) if SECAGG in content else None
        return cls(site, reply)


# ---------------------------------------------------------------------------------------------
# A site's own settings (Flower node config; never sent)


@dataclass(frozen=True)
class NodeConfig(_Record):
    """A site's Flower node config (``context.node_config``). ftclient sets ``site-name``,
    ``data-path`` (and ``eval-data-path``, ``lora-rank``) and ``verbose``; in ftsim Flower sets
    ``partition-id``, which indexes ftsim's site table. ``verbose``: the site prints its progress
    (ftclient); ftsim's coordinator prints every round instead."""

    site_name: str | None = _opt("site-name", "str", size=MAX_NAME_CHARS)
    data_path: str | None = _opt("data-path", "str", size=MAX_PATH_CHARS)
    eval_data_path: str | None = _opt("eval-data-path", "str", size=MAX_PATH_CHARS)
    lora_rank: int | None = _opt("lora-rank", "int")
    verbose: bool = _key("verbose", "bool", required=False, default=False)
    # federation.personalization: the folder this site keeps its private part in (ftclient: in its
    # --work-dir). Set by the site, never by the coordinator.
    state_dir: str | None = _opt("state-dir", "str", size=MAX_PATH_CHARS)
    partition_id: int | None = _opt("partition-id", "int")
    num_partitions: int | None = _opt("num-partitions", "int")

    WHAT: ClassVar[str] = "node config"

    def to_record(self) -> dict[str, str | int | bool]:  # type: ignore[override]
        """The node config as Flower takes it (``--node-config``: see :func:`fedtune.common.procs.flwr_config_string`)."""
        out = dict(super().to_record().items())
        if not self.verbose:
            out.pop("verbose", None)
        return out

    @classmethod
    def from_record(cls, node_config: Mapping) -> NodeConfig:
        """From ``context.node_config``; an empty ``eval-data-path`` or a ``lora-rank`` of 0 means none.
        MessageError names a key this site does not know or a value of the wrong type."""
        values = dict(node_config.items())
        if values.get("eval-data-path") == "":
            values.pop("eval-data-path")
        if values.get("lora-rank") in ("", 0):
            values.pop("lora-rank")
        nc = super().from_record(values)
        if nc.lora_rank is not None and nc.lora_rank < 1:
            raise MessageError(f"{cls.WHAT}: key 'lora-rank': expected a positive LoRA rank, got {nc.lora_rank}")
        return nc
