"""The coordinator's messaging: one exchange of messages with a set of sites, under a deadline,
and what may be read from a site's reply.

Every reply may come from an attacker. What a site sends reaches the coordinator's console,
``server.log``, ``metrics.json`` and the report only through this module:

- :func:`clean` makes any string a site sent one short line of printable text (control
  characters, ANSI escapes, line and paragraph separators and bidi/zero-width controls removed;
  length-capped), so it can neither forge a log line nor smuggle markup onto a line of its own;
- :func:`site_of` reads the site's name and status: the name restricted to the characters of a
  configured site name (``[A-Za-z0-9_.-]``, at most 64), the status to the known set, and a name
  that another node already uses (or a node's ``node-N`` fallback name) is disambiguated by the
  node id, so one site cannot pass as another;
- :func:`site_metrics` keeps only the known metric keys with their expected types and ranges,
  and counts the rest.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtune.common import messages

Printer = Callable[[str], None]


class FederationError(RuntimeError):
    """The run cannot go on (too few sites, a round that failed); it can be resumed later."""


def exchange(
    grid: Grid,
    nodes: list[int],
    content: RecordDict | Callable[[int], RecordDict],
    kind: str,
    timeout: float,
    on_reply: Callable[[Message, int], None],
) -> int:
    """Send one message per node (``content``, or ``content(node)`` when each differs); hand each
    reply (and the node it was sent to) to on_reply as it arrives, keeping none, so memory
    does not grow with the number of sites. -> number of replies in time."""
    msgs = [
        Message(content=content(n) if callable(content) else content, dst_node_id=n, message_type=kind) for n in nodes
    ]
    sent_to = dict(zip(grid.push_messages(msgs), nodes))
    pending = set(sent_to)
    received = 0
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        for m in grid.pull_messages(pending):
            pending.discard(m.metadata.reply_to_message_id)
            received += 1
            on_reply(m, sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id))
        if pending:
            time.sleep(0.02)
    return received


# ---------------------------------------------------------------------------------------------
# What a site's reply may put into the coordinator's records

REASON_CHARS = 300  # a reason or any other free text from a site
NAME_CHARS = 64  # as a configured site name (common.config.SiteConfig)
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_])")  # ANSI CSI, OSC, 2-byte
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_FALLBACK = re.compile(r"^node-(\d+)$")
# Statuses a site may report (declared in fedtune.common.messages); the coordinator adds error, unknown, invalid, rejected.
SITE_STATUSES = messages.SITE_STATUSES


def clean(value: object, limit: int = REASON_CHARS) -> str:
    """``value`` as one line of at most ``limit`` printable characters: ANSI escape sequences
    dropped; every other control or format character (Unicode categories C*, incl. newlines,
    NEL, bidi overrides and zero-width marks) and the line/paragraph separators (Zl, Zp) become
    a space; runs of spaces collapse; too long -> cut, ending in '…'."""
    text = value if isinstance(value, str) else repr(value) if isinstance(value, bytes) else str(value)
    text = _ESCAPES.sub("", text[: 8 * limit])  # the work is bounded whatever the size sent
    text = "".join(
        " " if unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") else ch for ch in text
    )
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_name(value: object) -> str:
    """A site's name as the coordinator records it: :func:`clean`, then only ``[A-Za-z0-9_.-]``
    (others -> '_'; ASCII only, so no look-alike letters), starting with a letter or digit, at
    most 64 characters, never empty: the rule of a configured site name."""
    name = _NOT_NAME.sub("_", clean(value, 4 * NAME_CHARS)).lstrip("_.-")[:NAME_CHARS]  # first an ASCII letter or digit
    return name or "unnamed"


class SiteNames(dict):
    """node id -> the name the coordinator records for it, and which node owns each name: the
    first node that reports a name keeps it for the run; another node reporting it is recorded
    as ``name@node-ID``. (A plain dict works with :func:`site_of` too, searched instead.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.owner: dict[str, int] = {v: k for k, v in self.items()}

    def __setitem__(self, node, name) -> None:
        super().__setitem__(node, name)
        self.owner.setdefault(name, node)


def _owner(names: dict, name: str) -> int | None:
    fallback = _FALLBACK.match(name)
    if fallback:  # 'node-7' is node 7's name whatever any site says
        return int(fallback.group(1))
    if isinstance(names, SiteNames):
        return names.owner.get(name)
    return next((n for n, v in names.items() if v == name), None)


def site_of(m: Message, node: int, names: dict | None = None) -> tuple[str, str]:
    """-> (site name, status) of a reply from ``node``; ``names`` remembers the names of nodes
    seen before, so an error that Flower raises for a vanished node still names its site.

    Status: the site's own (one of SITE_STATUSES); ``error`` (Flower's error reply), ``unknown``
    (no site record) or ``invalid`` (a site record that is not one, or an unknown status)."""
    names = {} if names is None else names
    fallback = names.get(node, f"node-{node}")
    if m.has_error():
        return fallback, "error"
    try:
        site = m.content.get(messages.SITE)
        raw_name, raw_status = (site.get("name"), site.get("status")) if site is not None else (None, None)
    except (AttributeError, TypeError):
        return fallback, "invalid"
    if site is None:
        return fallback, "unknown"
    if raw_name is None:
        return fallback, "invalid"
    name = clean_name(raw_name)
    owner = _owner(names, name)
    if owner is not None and owner != node:
        name = f"{name}@node-{node}"  # another node's name: never merged with, or passed off as, that site
    if names.get(node) != name:
        names[node] = name
    status = raw_status if isinstance(raw_status, str) and raw_status in SITE_STATUSES else "invalid"
    return name, status


def site_reason(m: Message, status: str) -> str:
    """Why a site sent no update: Flower's error (its first line), the site's ``reason``, or the status."""
    try:
        if m.has_error():
            return clean(str(m.error.reason).splitlines()[0] if m.error.reason else "error")
        site = m.content.get(messages.SITE)
        reason = site.get("reason") if site is not None else None
    except (AttributeError, TypeError, IndexError):
        reason = None
    return clean(reason if isinstance(reason, str) and reason.strip() else status)


# The metric keys a site may send and their types are declared once, in fedtune.common.messages
# (TrainMetrics, EvalMetrics): wire key -> (int or float, low, high); see messages.metric_value.
TRAIN_METRICS = messages.TRAIN_METRICS
EVAL_METRICS = messages.EVAL_METRICS


def _typed(value: object, kind) -> object | None:
    """``value`` as ``kind`` declares it (a type, or (type, low, high)), or None."""
    return messages.metric_value(value, kind if isinstance(kind, tuple) else (kind, -math.inf, math.inf))


def site_metrics(m: Message, schema: dict[str, object]) -> tuple[dict, int]:
    """-> (the reply's known metrics with their expected types, how many keys were dropped:
    unknown, or of the wrong type or range). Never raises on what a site sent."""
    try:
        record = m.content.get(messages.METRICS) if not m.has_error() else None
        items = list(record.items()) if record is not None else []
    except (AttributeError, TypeError):
        return {}, 1
    out: dict = {}
    dropped = 0
    for k, v in items:
        kind = schema.get(k) if isinstance(k, str) else None
        value = _typed(v, kind) if kind is not None else None
        if value is None:
            dropped += 1
        else:
            out[k] = value
    return out, dropped
