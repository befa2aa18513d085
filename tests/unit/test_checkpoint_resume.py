"""Checkpoints that lie, resume that falls back, and bounded disk (issue 15): a typed manifest
with the required files; any load error on resume falls back a round with its reason; old
checkpoints pruned (never the resume point or the best); a free-space check at start; a
disk-full error path that still says what happened."""

from __future__ import annotations

import errno
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from fedtune.common import checkpoint as ck
from fedtune.common import messages
from fedtune.common.checkpoint import ADAPTER_WEIGHTS, MANIFEST, save_adapter, verify_checkpoint
from fedtune.common.messages import EvalMetrics, EvalReply, SiteStatus
from fedtune.server import app as server

from .test_hostile_sites import constant, tiny_run_config
from .test_server_rounds import FakeGrid, _task_identity, server_round  # noqa: F401  (_task_identity: fixture)


def folder(tmp_path: Path, name: str = "ck") -> Path:
    return save_adapter(tmp_path / name, OrderedDict(w=torch.ones(3)), None, {"server_state.json": {"round": 1}})


@pytest.mark.parametrize(
    "manifest, why",
    [
        ({"files": {}}, "lists no " + ADAPTER_WEIGHTS),
        ({"files": []}, "manifest"),
        ({"files": None}, "manifest"),
        ({}, "manifest"),
        ([], "manifest"),
        ({"files": {ADAPTER_WEIGHTS: "0" * 64}, "extra": 1}, "manifest"),
        ({"files": {"../../etc/passwd": "0" * 64, ADAPTER_WEIGHTS: "0" * 64}}, "manifest"),
        ({"files": {ADAPTER_WEIGHTS: 5}}, "manifest"),
    ],
)
def test_a_manifest_that_lies_does_not_verify(tmp_path, manifest, why):
    d = folder(tmp_path)
    assert verify_checkpoint(d) is None
    (d / MANIFEST).write_text(json.dumps(manifest))
    reason = verify_checkpoint(d)
    assert reason is not None and why in reason, reason


def test_a_required_file_missing_from_the_manifest_fails_verification(tmp_path):
    d = save_adapter(tmp_path / "ck", OrderedDict(w=torch.ones(3)), None)  # no server_state.json
    assert verify_checkpoint(d) is None
    assert "lists no server_state.json" in verify_checkpoint(d, required=(ADAPTER_WEIGHTS, "server_state.json"))


def run_two_rounds(tiny_config, out: Path, **federation):
    cfg = tiny_run_config(tiny_config, rounds=2, **federation)
    grid = FakeGrid({1: constant(1e-3, name="a"), 2: constant(2e-3, name="b")})
    server.run_federation(grid, cfg, out, lambda s: None)
    return cfg, grid


@pytest.mark.parametrize(
    "damage", ["empty manifest", "files as a list", "weights not safetensors", "server state not json"]
)
def test_resume_falls_back_a_round_when_the_last_checkpoint_cannot_be_loaded(tiny_config, tmp_path, damage):
    """Round 2's checkpoint is damaged so that it verifies (or not) but cannot load: resume says
    why and continues from round 1 instead of failing in safetensors or json."""
    out = tmp_path / "run"
    cfg, grid = run_two_rounds(tiny_config, out)
    d = out / "checkpoints" / "round-0002"
    manifest = json.loads((d / MANIFEST).read_text())
    if damage == "empty manifest":
        (d / MANIFEST).write_text('{"files": {}}')
    elif damage == "files as a list":
        (d / MANIFEST).write_text('{"files": []}')
    else:  # content whose hash the manifest records: it verifies, and fails to load
        name, data = (
            (ADAPTER_WEIGHTS, b"not a safetensors file")
            if damage.startswith("weights")
            else (server.SERVER_STATE, b"{not json")
        )
        (d / name).write_bytes(data)
        manifest["files"][name] = ck._sha256(data)
        (d / MANIFEST).write_text(json.dumps(manifest))
    said: list[str] = []
    rs = server.run_federation(grid, cfg, out, said.append, resume=True)
    assert any(s.startswith("resume: not using round 2:") for s in said), said
    assert any("resuming after round 1" in s for s in said)
    assert [r["round"] for r in rs.rounds] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Bounded disk


def scripted(losses: dict[int, float], name: str, value: float = 1e-3):
    """A site whose eval loss in round r is losses[r] (round 0: the base model)."""

    def handle(m):
        if m.metadata.message_type == messages.EVALUATE:
            metrics = EvalMetrics(num_examples=4, eval_loss=losses[server_round(m)])
            return EvalReply(SiteStatus(name, "ok"), metrics).to_record()
        return constant(value, name=name)(m)

    return handle


def test_old_checkpoints_are_pruned_but_never_the_resume_point_or_the_best(tiny_config, tmp_path):
    """keep_checkpoints 2 over 5 rounds whose best is round 2: checkpoints 2, 4 and 5 remain, and
    the run resumes from round 5 to a 6th round."""
    losses = {0: 3.0, 1: 2.5, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0, 6: 2.0}
    cfg = tiny_run_config(tiny_config, rounds=5)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"keep_checkpoints": 2})})
    out = tmp_path / "run"
    rs = server.run_federation(FakeGrid({1: scripted(losses, "a")}), cfg, out, lambda s: None)
    assert rs.best()["round"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0002", "round-0004", "round-0005"]
    more = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 6})})
    said: list[str] = []
    rs = server.run_federation(FakeGrid({1: scripted(losses, "a")}), more, out, said.append, resume=True)
    assert any("resuming after round 5" in s for s in said) and [r["round"] for r in rs.rounds] == list(range(7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0002", "round-0005", "round-0006"]


def test_with_baselines_the_starting_checkpoint_is_never_pruned(tiny_config, tmp_path):
    """ftsim --baselines trains every baseline from round 0's adapter: the demo's 3 rounds with
    keep_checkpoints 3 used to prune it, and the baselines then refused to start."""
    losses = {0: 3.0, 1: 2.5, 2: 1.0, 3: 2.0, 4: 2.0}
    cfg = tiny_run_config(tiny_config, rounds=4)
    cfg = cfg.model_copy(
        update={
            "output": cfg.output.model_copy(update={"keep_checkpoints": 2}),
            "simulation": cfg.simulation.model_copy(update={"baselines": True}),
        }
    )
    out = tmp_path / "run"
    server.run_federation(FakeGrid({1: scripted(losses, "a")}), cfg, out, lambda s: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0000",
        "round-0002",
        "round-0003",
        "round-0004",
    ]
    assert verify_checkpoint(out / "checkpoints" / "round-0000") is None


def test_a_pruning_interrupted_midway_leaves_no_torn_checkpoint_and_is_finished_later(tiny_config, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_config, rounds=3)
    rs = server.run_federation(FakeGrid({1: constant(1e-3, name="a")}), cfg, out, lambda s: None)
    trash = out / "checkpoints" / ".pruned-round-0000"
    (out / "checkpoints" / "round-0000").rename(trash)  # as if killed between the rename and the deletion
    server.prune_checkpoints(rs, lambda s: None)
    assert not trash.exists()
    assert all(verify_checkpoint(p) is None for p in (out / "checkpoints").iterdir())


def test_a_run_that_cannot_fit_its_checkpoints_refuses_to_start_and_says_why(tiny_config, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    cfg = tiny_run_config(tiny_config)
    with pytest.raises(
        server.FederationError,
        match=r"MB free on its disk, about .* MB needed: 6 copies of a .* MB checkpoint \(output.keep_checkpoints 3",
    ):
        server.run_federation(FakeGrid({1: constant(1e-3, name="a")}), cfg, tmp_path / "run", lambda s: None)


def deploy_context(out: Path, cfg) -> object:
    from flwr.app import Context, RecordDict

    (out.parent / "cfg.json").write_text(cfg.to_json())
    return Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"config-path": str(out.parent / "cfg.json"), "out-dir": str(out), "resume": False},
    )


def test_the_error_path_reports_a_full_disk_even_when_nothing_can_be_written(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """Every write fails with ENOSPC (simulated): the ServerApp still ends with its status, on
    stderr, and ftserver reads 'disk full' from it, not 'ended without a result'."""
    from fedtune.server import deploy

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def run_federation(grid, cfg, out, say, **kw):
        say("round 1 ...")
        no_space()

    monkeypatch.setattr(deploy, "run_federation", run_federation)
    monkeypatch.setattr(deploy, "atomic_write_json", no_space)
    monkeypatch.setattr(deploy, "atomic_write_bytes", no_space)
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda f, *a, **k: no_space() if str(f).endswith(deploy.SERVER_LOG) else real_open(f, *a, **k)
    )
    out = tmp_path / "run"
    with pytest.raises(OSError):
        deploy.main(None, deploy_context(out, tiny_run_config(tiny_config)))
    err = capsys.readouterr().err
    assert "cannot append (disk full" in err and deploy.STATUS_MARK in err
    assert not (out / deploy.RUN_STATUS).exists()
    assert deploy.missing_status_reason(out, err).startswith("disk full: [Errno 28]")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (needs the right to mount: root in a container that allows it; else skipped)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_on_a_really_full_disk_run_status_still_says_disk_full(tiny_config, tiny_disk, monkeypatch):
    """The disk fills up during the run (a real ENOSPC on a 2 MB tmpfs): the reserve held at the
    start is given up so run-status.json can say 'disk full'."""
    from fedtune.server import deploy

    out = tiny_disk / "run"

    def run_federation(grid, cfg, out, say, **kw):
        with open(out / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()

    monkeypatch.setattr(deploy, "run_federation", run_federation)
    with pytest.raises(OSError):
        deploy.main(None, deploy_context(out, tiny_run_config(tiny_config)))
    status = json.loads((out / deploy.RUN_STATUS).read_text())
    assert status["status"] == "failed" and status["reason"].startswith("disk full: [Errno 28]"), status
    (out / deploy.RUN_STATUS).unlink()  # and had it not been written: ftserver says so from the disk itself
    assert deploy.missing_status_reason(out).startswith("disk full")


def test_the_run_record_is_written_and_resumed_through_its_schema(tiny_config, tmp_path):
    """metrics.json is written by server/record.py's writer (schema_version first) and read back on
    resume through its reader: a record that does not match the schema is refused by the key's path."""
    from fedtune.server.record import SCHEMA_VERSION, read_record

    out = tmp_path / "run"
    cfg, grid = run_two_rounds(tiny_config, out)
    doc = json.loads((out / "metrics.json").read_text())
    assert next(iter(doc)) == "schema_version" and doc["schema_version"] == SCHEMA_VERSION
    assert [r.round for r in read_record(out / "metrics.json").rounds] == [0, 1, 2]
    doc["rounds"][1]["accepted"] = "two"
    (out / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(server.FederationError, match=r"cannot resume, no readable run record: .*rounds\[1\]"):
        server.run_federation(grid, cfg, out, lambda s: None, resume=True)
