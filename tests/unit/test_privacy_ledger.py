"""The DP ledger (issue 15): a coordinator killed with SIGKILL after a round's noised adapter was
written but before the round was recorded must not get that release for free on resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common import privacy
from fedtune.common.config import load_config
from fedtune.server import app as server

from .test_hostile_sites import constant
from .test_server_rounds import FakeGrid, _task_identity  # noqa: F401  (fixture)

TESTS = Path(__file__).resolve().parents[1]

# The child: a real coordinator (run_federation) with DP on over two fake sites; it kills itself
# with SIGKILL right after save_round of round KILL_ROUND returns (checkpoint and adapter/ written,
# metrics.json not yet): the noised adapter of that round has been released.
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
from fedtune.common.config import FedTuneConfig
from fedtune.server import app as server
from unit.test_server_rounds import FakeGrid
from unit.test_hostile_sites import constant

cfg = FedTuneConfig.from_json(Path(sys.argv[1]).read_text())
kill_round = int(sys.argv[4])
real = server.save_round

def save_round(rs, rnd):
    real(rs, rnd)
    if rnd == kill_round:
        os.kill(os.getpid(), signal.SIGKILL)

server.save_round = save_round
server.run_federation(FakeGrid({1: constant(1e-3, name="a"), 2: constant(2e-3, name="b")}), cfg, Path(sys.argv[2]), lambda s: None)
"""


def dp_config(tiny_config, rounds: int):
    data = json.loads(tiny_config.to_json())
    data["federation"].update(rounds=rounds, min_sites=1, round_timeout_s=5, join_timeout_s=1)
    data["output"]["plots"] = False
    data["privacy"] = {"epsilon": 100.0, "clip": 0.05, "noise_multiplier": 1.0}
    return load_config(None, base=data)


def killed_run(cfg, out: Path, tmp_path: Path, kill_round: int) -> None:
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cfg.json"), str(out), str(TESTS), str(kill_round)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]


def test_a_round_released_before_a_kill_stays_charged_after_resume(tiny_config, tmp_path):
    """Killed (SIGKILL) after round 1's checkpoint and adapter were written, before metrics.json
    recorded it: resume falls back to round 0 and reruns round 1, a second release. The
    accountant must count three releases after rounds 1..2 (round 1 twice), not two."""
    cfg = dp_config(tiny_config, rounds=2)
    out = tmp_path / "run"
    killed_run(cfg, out, tmp_path, kill_round=1)
    assert (out / "checkpoints" / "round-0001").is_dir() and (out / "adapter").is_dir()
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [0]  # round 1 unrecorded
    lines = [json.loads(x) for x in (out / privacy.LEDGER).read_text().splitlines()]
    assert [x["event"] for x in lines] == ["start", "charge"] and lines[1]["round"] == 1 and lines[1]["released"]

    said: list[str] = []
    rs = server.run_federation(
        FakeGrid({1: constant(1e-3, name="a"), 2: constant(2e-3, name="b")}), cfg, out, said.append, resume=True
    )
    assert any("resuming after round 0" in s for s in said)
    assert rs.accountant.history == [[1.0, 1.0, 3]]  # round 1 (killed), round 1 again, round 2
    assert any("privacy ledger: 1 round(s) charged, the checkpoint's accountant 0" in s for s in said)
    assert rs.rounds[-1]["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_of([(1.0, 1.0, 3)], 1e-5))
    lines = [json.loads(x) for x in (out / privacy.LEDGER).read_text().splitlines()]
    assert [(x["event"], x.get("round")) for x in lines] == [
        ("start", None),
        ("charge", 1),
        ("charge", 1),
        ("charge", 2),
    ]
    # The checkpoint's accountant agrees from now on: a later resume needs no ledger.
    state = json.loads((out / "checkpoints" / "round-0002" / server.SERVER_STATE).read_text())
    assert state["privacy"]["history"] == [[1.0, 1.0, 3]]


def test_the_ledger_reader_skips_a_torn_line_and_restarts_at_a_fresh_run(tmp_path):
    path = tmp_path / privacy.LEDGER
    privacy.ledger_start(path, 1e-5)
    privacy.ledger_charge(path, 1, 1.0, 2.0, 0.5, True)
    privacy.ledger_start(path, 1e-5)  # a fresh run in the same folder: the earlier charges are not this run's
    privacy.ledger_charge(path, 1, 0.5, 1.0, 0.3, True)
    with open(path, "a") as f:
        f.write('{"event": "charge", "round": 2, "q": 0.5, "sig')  # a crash mid-line: that release never happened
    assert privacy.ledger_accountant(path, 1e-5).history == [[0.5, 1.0, 1]]
    privacy.ledger_charge(path, 2, 0.5, 1.0, 0.4, True)  # the next line starts on a line of its own
    assert privacy.ledger_accountant(path, 1e-5).history == [[0.5, 1.0, 2]]
    assert privacy.ledger_accountant(tmp_path / "none.jsonl", 1e-5) is None
