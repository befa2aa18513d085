"""The ServerApp that ``ftserver`` submits to its SuperLink (Flower's Deployment Engine).

Flower runs it in a ``flwr-serverapp`` process beside the SuperLink, so it reads what ftserver
prepared on this machine, named in the run config (``[tool.flwr.app.config]`` of the app
folder ftserver writes, see :func:`write_app_dir`):

- ``config-path``: the resolved, validated FedTuneConfig (JSON), written by ftserver;
- ``out-dir``: where checkpoints, ``metrics.json`` and the report go;
- ``resume``: continue from the last verified checkpoint in ``out-dir``.

It appends every progress line to ``out-dir/server.log`` (which ftserver streams to its
console) and, when it ends, writes ``out-dir/run-status.json``: ``{"status": "completed"}``,
``{"status": "failed", "reason": ...}`` or ``{"status": "stopped"}``, which decides
ftserver's exit code. That error path cannot itself fail on a full disk: a small reserve file
written at the start is given up to make room for the status, and if even that fails the
status goes to stderr (``STATUS_MARK``), where ftserver finds it (:func:`missing_status_reason`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.checkpoint import atomic_write_bytes, atomic_write_json
from fedtune.common.config import FedTuneConfig
from fedtune.common.flwr_latency import tune_serverapp
from fedtune.common.threads import set_threads

from .app import FederationError, run_federation
from .secure import KeyFolder

SERVER_LOG = "server.log"
RUN_STATUS = "run-status.json"
APP_PYPROJECT = """\
# Written by ftserver: the Flower app it submits to its own SuperLink. The components are
# fedtune's installed modules; sites run fedtune's own resident executor whatever this names.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtune-run"
version = "1.0.0"
description = "A fedtune federated fine-tuning run"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.server.deploy:app"
clientapp = "fedtune.client.app:app"

[tool.flwr.app.config]
config-path = ""
out-dir = ""
resume = false
"""


def write_app_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    return directory


ORPHAN_GRACE_S = 10.0
EXIT_ORPHANED = 70


def exit_when_orphaned(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5, on_exit=None) -> None:
    """End this process when the process that started it is gone (ftserver killed, its SuperExec
    with it). Flower's own monitor interrupts the main thread then, but a ServerApp waiting on
    object pulls whose retries never end against the dead SuperLink outlives it, holding the run's
    lock, so a resumed run would find "another ServerApp still running". After ``grace_s`` for the
    graceful path, the process exits at once: every checkpoint is written atomically, so nothing
    is torn, and the kernel drops the run lock. ``on_exit``: called first (writes the run status)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)
        try:
            if on_exit is not None:
                on_exit()
        finally:
            os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="fedtune-orphan-watch", daemon=True).start()


def hold_run_lock(out: Path, wait_s: float = 60.0):
    """Hold ``out/.ftserver/serverapp.lock`` for this process's life (the kernel drops it when
    the process dies, even by SIGKILL). A resumed run's ServerApp waits here until the previous
    one, which may outlive a killed ftserver by a few seconds, is gone: never two writers."""
    path = out / ".ftserver" / "serverapp.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 - kept open (and locked) until the process exits
    deadline = time.time() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() > deadline:
                f.close()
                raise FederationError(
                    f"{path}: another ServerApp of this run is still running after {wait_s:.0f} s"
                ) from None
            time.sleep(0.2)


LOG_LINE_CHARS = 4000  # a progress line longer than this is cut (site text in it is capped far below: messaging.clean)
RESERVE = ".ftserver/status-reserve"  # space held back so that the error path can write run-status.json on a full disk
RESERVE_BYTES = 256 << 10
STATUS_MARK = "fedtune-run-status: "  # on stderr when run-status.json cannot be written: ftserver reads it from the ServerApp's log


def make_logger(out: Path):
    """-> say(msg): one timestamped line to stdout and ``out/server.log``. It never raises: when
    the log cannot be written (a full disk) the line still goes to stdout, and stderr says once
    why the log stopped. Lines are one per event and capped, and every string a site sent in them
    is one capped line (server.messaging.clean), so the log grows with rounds x sites only."""
    log_path = out / SERVER_LOG
    broken: list[str] = []

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if len(line) > LOG_LINE_CHARS:
            line = line[: LOG_LINE_CHARS - 1] + "…"
        print(line, flush=True)
        try:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            if not broken:
                broken.append(str(e))
                print(
                    f"{log_path}: cannot append ({disk_full_or(e)}); progress lines go to stdout only",
                    file=sys.stderr,
                    flush=True,
                )

    return say


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it came from, is ENOSPC/EDQUOT (no space, over quota)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_or(e: BaseException) -> str:
    return f"disk full: {e}" if is_disk_full(e) else f"{type(e).__name__}: {e}"


def hold_reserve(out: Path) -> None:
    """Write the reserve file (best effort): the error path deletes it to make room for its status."""
    try:
        atomic_write_bytes(out / RESERVE, b"\0" * RESERVE_BYTES)
    except OSError:
        pass


def write_status(out: Path, doc: dict) -> None:
    """``out/run-status.json``; this cannot fail. On a full disk the reserve is given up for it
    and the write retried; failing that, the status goes to stderr as one ``STATUS_MARK`` line,
    which ftserver finds in the ServerApp's log."""
    for attempt in range(2):
        try:
            atomic_write_json(out / RUN_STATUS, doc)
            return
        except OSError:
            if attempt == 0:
                try:
                    (out / RESERVE).unlink(missing_ok=True)
                except OSError:
                    pass
        except Exception:  # noqa: BLE001 - a status that is not JSON-able: keep its reason only
            doc = {"status": doc.get("status", "failed"), "reason": str(doc.get("reason"))}
    try:
        print(STATUS_MARK + json.dumps(doc, default=str), file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - nothing else can be done
        pass


def missing_status_reason(out: Path, log_text: str = "") -> str | None:
    """ftserver, when the ServerApp left no run-status.json: the status it printed instead
    (``log_text``: its log), or, when the run folder's disk is (nearly) full, that. None: neither."""
    for line in reversed(log_text.splitlines()):
        at = line.find(STATUS_MARK)
        if at >= 0:
            try:
                doc = json.loads(line[at + len(STATUS_MARK) :])
                return str(doc.get("reason") or doc.get("status"))
            except ValueError:
                break
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return None
    if free < 4 * RESERVE_BYTES:
        return f"disk full: {free:,} bytes free on the disk of {out}; the ServerApp could not write its status. Free space, then resume"
    return None


tune_serverapp()  # this module runs in Flower's flwr-serverapp process
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    say = make_logger(out)
    try:
        lock = hold_run_lock(out)
    except FederationError as e:
        say(f"FAILED: {e}")
        raise
    (out / RUN_STATUS).unlink(missing_ok=True)
    hold_reserve(out)
    exit_when_orphaned(on_exit=lambda: write_status(out, {"status": "stopped", "reason": "the coordinator is gone"}))
    try:
        cfg = FedTuneConfig.from_json(Path(str(rc["config-path"])).read_text())
        say(f"the coordinator's scoring and exports use {set_threads()} CPU thread(s)")
        # Secure aggregation publishes the registered site keys (--authorized-keys) to the sites.
        rs = run_federation(grid, cfg, out, say, resume=bool(rc.get("resume", False)), site_keys=KeyFolder.of_run(out))
    except FederationError as e:
        say(f"FAILED: {e}")
        write_status(out, {"status": "failed", "reason": str(e)})
        raise
    except (KeyboardInterrupt, SystemExit):
        say("stopped: the coordinator is shutting down (checkpoints so far are kept)")
        write_status(out, {"status": "stopped"})
        raise
    except BaseException as e:
        # Every write of the error path (server.log, run-status.json) copes with a full disk.
        reason = disk_full_or(e) + (
            " (free space on the disk of the output folder, then resume)" if is_disk_full(e) else ""
        )
        say(f"FAILED: {reason}")
        write_status(out, {"status": "failed", "reason": reason, "traceback": traceback.format_exc()})
        raise
    write_status(out, {"status": "completed", "rounds": rs.rounds[-1]["round"]})
    lock.close()
