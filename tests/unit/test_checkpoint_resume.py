"""Checkpoints that lie, resume that falls back, and bounded disk (issue 15): a typed manifest
with the required files; any load error on resume falls back a round with its reason; old
checkpoints pruned (never the resume point or the best); a free-space check at start; a
disk-full error path that still says what happened."""

from __future__ import annotations

import errno
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.common import checkpoint as ck
from fedtune.common.checkpoint import ADAPTER_WEIGHTS, MANIFEST, save_adapter, verify_checkpoint
from fedtune.server import app as server

from .test_hostile_sites import constant, tiny_run_config
from .test_server_rounds import FakeGrid, _task_identity  # noqa: F401  (fixture)


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


@pytest.mark.parametrize("damage", ["empty manifest", "files as a list", "weights not safetensors", "server state not json"])
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
        name, data = (ADAPTER_WEIGHTS, b"not a safetensors file") if damage.startswith("weights") else (server.SERVER_STATE, b"{not json")
        (d / name).write_bytes(data)
        manifest["files"][name] = ck._sha256(data)
        (d / MANIFEST).write_text(json.dumps(manifest))
    said: list[str] = []
    rs = server.run_federation(grid, cfg, out, said.append, resume=True)
    assert any(s.startswith("resume: not using round 2:") for s in said), said
    assert any("resuming after round 1" in s for s in said)
    assert [r["round"] for r in rs.rounds] == [0, 1, 2]
