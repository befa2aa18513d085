"""The coordinator's messaging: one exchange of messages with a set of sites, under a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

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
    msgs = [Message(content=content(n) if callable(content) else content, dst_node_id=n, message_type=kind) for n in nodes]
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


def site_of(m: Message, node: int, names: dict | None = None) -> tuple[str, str]:
    """-> (site name, status) of a reply from ``node``; ``names`` remembers the names of nodes
    seen before, so an error that Flower raises for a vanished node still names its site."""
    names = {} if names is None else names
    fallback = names.get(node, f"node-{node}")
    if m.has_error():
        return fallback, "error"
    site = m.content.get("site")
    if site is None:
        return fallback, "unknown"
    names[node] = str(site["name"])
    return str(site["name"]), str(site["status"])
