"""Shorter waits inside Flower's Deployment Engine, for rounds that cost training, not polling.

Flower 1.42's defaults suit thousands of devices that answer in minutes: a SuperNode with
nothing to do asks the SuperLink for work every 3 s, waits for its own reply in 0.5 s
steps, and retries an object that is not there yet after 1 s, doubling to 10 s (both the
SuperNode fetching a message and the ServerApp fetching a reply do this). Measured on
localhost, that added about 10 s to every message exchange, two per round.

fedtune federates a handful of sites whose rounds take minutes, so we tighten these in the
processes we start (the SuperNode through ``python -m fedtune.client.supernode``, the
ServerApp when :mod:`fedtune.server.deploy` loads). The idle poll stays at a level a
SuperLink serves easily for hundreds of sites (``FEDTUNE_SUPERNODE_POLL_S``, default 0.5 s).

The simulation engine (ftsim) hands each virtual node its next message from a loop that
sleeps 0.1 s between passes: every exchange of a round waits for it, which a secure round
(five exchanges) feels. :func:`tune_simulation` makes that 0.01 s, in-process.
"""

from __future__ import annotations

import functools
import os
import time

OBJECT_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5}


def supernode_poll_s() -> float:
    raw = os.environ.get("FEDTUNE_SUPERNODE_POLL_S", "0.5")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FEDTUNE_SUPERNODE_POLL_S={raw!r}: expected seconds, e.g. 0.5") from None
    if not 0.05 <= value <= 60:
        raise ValueError(f"FEDTUNE_SUPERNODE_POLL_S={raw!r}: expected 0.05..60 seconds")
    return value


class _Clock:
    """``time`` for Flower's SuperNode loop: its 3 s idle sleep becomes ``idle``, shorter waits at most 0.1 s."""

    def __init__(self, idle: float):
        self.idle = idle

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle if seconds >= 3 else min(seconds, 0.1))


def _fast_pulls(module) -> None:
    if not getattr(module.pull_objects, "_fedtune", False):
        fast = functools.partial(module.pull_objects, **OBJECT_BACKOFF)
        fast._fedtune = True  # type: ignore[attr-defined]
        module.pull_objects = fast


def tune_supernode() -> None:
    from flwr.supernode import start_client_internal as sci

    sci.time = _Clock(supernode_poll_s())
    _fast_pulls(sci)


def tune_serverapp() -> None:
    from flwr.superlink.grid import http_grid

    _fast_pulls(http_grid)


SIMULATION_POLL_S = 0.01


class _ShortWaits:
    """A stop event whose ``wait`` never sleeps longer than ``cap`` seconds."""

    def __init__(self, event, cap: float):
        self.event, self.cap = event, cap

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(self.cap if timeout is None else min(timeout, self.cap))


def tune_simulation() -> None:
    """The simulation engine picks up new messages for virtual nodes every 0.01 s, not 0.1 s."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    if getattr(original, "_fedtune", False):
        return

    @functools.wraps(original)
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        return original(state, queue, nodes_mapping, _ShortWaits(f_stop, SIMULATION_POLL_S))

    add_messages_to_queue._fedtune = True  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
