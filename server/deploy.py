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
ftserver's exit code.
"""

from __future__ import annotations

import fcntl
import time
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.checkpoint import atomic_write_json
from fedtune.common.config import FedTuneConfig
from fedtune.common.flwr_latency import tune_serverapp

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
                raise FederationError(f"{path}: another ServerApp of this run is still running after {wait_s:.0f} s") from None
            time.sleep(0.2)


def make_logger(out: Path):
    log_path = out / SERVER_LOG

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return say


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
    try:
        cfg = FedTuneConfig.from_json(Path(str(rc["config-path"])).read_text())
        # Secure aggregation publishes the registered site keys (--authorized-keys) to the sites.
        rs = run_federation(grid, cfg, out, say, resume=bool(rc.get("resume", False)), site_keys=KeyFolder.of_run(out))
    except FederationError as e:
        say(f"FAILED: {e}")
        atomic_write_json(out / RUN_STATUS, {"status": "failed", "reason": str(e)})
        raise
    except (KeyboardInterrupt, SystemExit):
        say("stopped: the coordinator is shutting down (checkpoints so far are kept)")
        atomic_write_json(out / RUN_STATUS, {"status": "stopped"})
        raise
    except BaseException as e:
        say(f"FAILED: {type(e).__name__}: {e}")
        atomic_write_json(out / RUN_STATUS, {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        raise
    atomic_write_json(out / RUN_STATUS, {"status": "completed", "rounds": rs.rounds[-1]["round"]})
    lock.close()
