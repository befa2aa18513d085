"""The site's resident executor (what it does when a task stalls), Flower latency settings,
and the child-process helpers ftserver/ftclient/deploy_localhost rely on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

from fedtune.client.worker import ResidentExecutor
from fedtune.common import flwr_latency
from fedtune.common.procs import end_of, flwr_config_string, follow, spawn, stop


def _executor(newer: list) -> ResidentExecutor:
    ex = ResidentExecutor("127.0.0.1:1", handler=lambda *a: None)
    ex.acquire = lambda: newer.pop(0) if newer else None  # type: ignore[method-assign]
    return ex


def _never_there(object_id: str) -> bytes:
    raise ObjectUnavailableError(object_id)


def test_a_stalled_task_is_abandoned_once_the_supernode_has_a_newer_one():
    ex = _executor([None, "newer-token"])
    watched = ex._watch(_never_there, check_every_s=0)
    with pytest.raises(ObjectUnavailableError):  # no newer task yet: keep waiting (Flower retries)
        watched("obj")
    assert ex.superseded_by is None
    with pytest.raises(ObjectPullError, match="abandoned this task for a newer one"):
        watched("obj")
    assert ex.superseded_by == "newer-token"  # serve() runs it next
    with pytest.raises(ObjectPullError):  # the other pull thread stops too, without asking again
        watched("obj2")


def test_objects_that_arrive_pass_through_and_no_task_is_taken():
    ex = _executor(["should-not-be-taken"])
    watched = ex._watch(lambda oid: oid.encode(), check_every_s=0)
    assert watched("abc") == b"abc"
    assert ex.superseded_by is None


def test_the_newer_task_is_not_looked_for_more_often_than_asked():
    asked = []
    ex = ResidentExecutor("127.0.0.1:1", handler=lambda *a: None)
    ex.acquire = lambda: asked.append(1)  # type: ignore[method-assign]
    watched = ex._watch(_never_there, check_every_s=60)
    for _ in range(50):
        with pytest.raises(ObjectUnavailableError):
            watched("obj")
    assert asked == []  # the first check is check_every_s after the pull began


def test_supernode_clock_shortens_flowers_waits(monkeypatch):
    slept = []
    monkeypatch.setattr(flwr_latency.time, "sleep", slept.append)
    clock = flwr_latency._Clock(idle=0.5)
    clock.sleep(3)  # the idle poll
    clock.sleep(0.5)  # waiting for a reply
    assert slept == [0.5, 0.1]
    assert clock.monotonic is time.monotonic  # everything else is time's own


@pytest.mark.parametrize("value, ok", [("0.25", True), ("abc", False), ("0", False), ("120", False)])
def test_supernode_poll_setting_is_checked(monkeypatch, value, ok):
    monkeypatch.setenv("FEDTUNE_SUPERNODE_POLL_S", value)
    if ok:
        assert flwr_latency.supernode_poll_s() == float(value)
    else:
        with pytest.raises(ValueError, match="FEDTUNE_SUPERNODE_POLL_S"):
            flwr_latency.supernode_poll_s()


def test_serverapp_object_pulls_are_tightened_once():
    import functools

    from flwr.superlink.grid import http_grid

    original = http_grid.pull_objects
    # Importing fedtune.server.deploy (as other tests do) has already tuned this process once.
    bare = original.func if isinstance(original, functools.partial) else original
    try:
        flwr_latency.tune_serverapp()
        flwr_latency.tune_serverapp()
        assert http_grid.pull_objects.keywords == flwr_latency.OBJECT_BACKOFF
        assert http_grid.pull_objects.func is bare  # wrapped once, not twice
    finally:
        http_grid.pull_objects = original


def test_flwr_config_string_types():
    from flwr.common.config import parse_config_args

    text = flwr_config_string({"a": True, "b": 3, "c": 0.5, "d": "x y"})
    assert parse_config_args([text]) == {"a": True, "b": 3, "c": 0.5, "d": "x y"}


def test_follow_hands_over_whole_lines_as_they_are_written(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("old line\n")
    got: list[str] = []
    done = threading.Event()
    t = threading.Thread(target=follow, args=(log, done, got.append, end_of(log)))
    with open(log, "a") as f:
        f.write("before the thread ran\n")  # written after the caller took the end, before the thread started
    t.start()
    time.sleep(0.4)
    with open(log, "a") as f:
        f.write("first\nsec")
        f.flush()
        time.sleep(0.5)
        f.write("ond\n")
    time.sleep(0.5)
    done.set()
    t.join(5)
    assert got == ["before the thread ran", "first", "second"]  # not the old line, and the split line whole


def test_stop_ends_the_child_and_what_it_started(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    proc = spawn([sys.executable, "-c", script], tmp_path / "c.log")
    deadline = time.time() + 20
    while "up" not in (tmp_path / "c.log").read_text() and time.time() < deadline:
        time.sleep(0.1)
    group = proc.pid

    def alive() -> list[str]:  # the group's processes that are not zombies waiting to be reaped
        out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout
        return [
            line for line in out.splitlines() if line.split()[0] == str(group) and not line.split()[1].startswith("Z")
        ]

    assert len(alive()) == 2
    assert stop(proc, timeout=5) is not None
    deadline = time.time() + 5
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert alive() == []


ORPHAN = """
import signal, sys, threading
from fedtune.server.deploy import exit_when_orphaned
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # as deaf as a ServerApp stuck in endless pull retries
exit_when_orphaned(grace_s=0.2, poll_s=0.05, on_exit=lambda: print("status written", flush=True))
print("ready", flush=True)
threading.Event().wait()
"""


def _orphan_outlives_its_parent(tmp_path, child_code: str) -> tuple[bool, str]:
    """Start a parent that starts ``child_code`` and exits once the child is ready, the way
    ftserver's SuperExec dies under its ServerApp. -> (the child still runs 4 s later, its output)."""
    import os

    out = tmp_path / "child.out"
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child_code!r}], stdout=open({str(out)!r}, 'w'), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        f"while 'ready' not in open({str(out)!r}).read(): time.sleep(0.05)\n"
    )
    pid = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60).stdout)
    try:
        deadline = time.time() + 4
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False, out.read_text()
            time.sleep(0.1)
        return True, out.read_text()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_serverapp_whose_coordinator_is_gone_exits_and_says_so(tmp_path):
    """A ServerApp that cannot be interrupted (Flower's parent monitor SIGINTs it; one stuck in
    object-pull retries against the dead SuperLink never returns) still ends once its parent is
    gone, after writing its status, so a resumed run does not wait on its lock."""
    alive, said = _orphan_outlives_its_parent(tmp_path, ORPHAN)
    assert not alive and "status written" in said
    # The attack's premise: without the watch, such a process outlives its parent.
    alive, _ = _orphan_outlives_its_parent(tmp_path, ORPHAN.replace("exit_when_orphaned(", "(lambda **k: None)("))
    assert alive
