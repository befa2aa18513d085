"""server/record.py: metrics.json's schema (RunRecord, versioned) and its writer and reader.

A real run's record validates; the writer writes the same JSON it was given (schema_version
first); a document with a wrong type, an unknown key or an unknown schema_version is refused
with a message that names the key, and nothing is written."""

from __future__ import annotations

import copy
import json

import pytest

from fedtune.common.config import load_config
from fedtune.server import app as server
from fedtune.server.record import (
    SCHEMA_VERSION,
    RecordError,
    RoundRecord,
    RunRecord,
    read_record,
    validate_record,
    write_record,
)

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import method_config, real_sites, tiny_config  # noqa: F401  (fixture: the 64-wide tiny model)
from .test_server_rounds import _task_identity  # noqa: F401  (fixture)

_RUN: dict = {}  # one real run for the module: its metrics.json's path


@pytest.fixture
def run_doc(tiny_config, tmp_path_factory):
    """A real 1-round run of two sites (LoRA, one site at rank 2): (its metrics.json, the document
    as json reads it). Run once per module; each test gets its own copy of the document."""
    if "path" not in _RUN:
        data = json.loads(method_config(tiny_config, "lora").to_json())
        data["train"]["local_steps"] = 2
        data["eval"]["forgetting"] = False
        cfg = load_config(None, base=data)
        grid, _ = real_sites(("medical", "financial"), {"financial": 2})
        out = tmp_path_factory.mktemp("record-run")
        server.run_federation(grid, cfg, out, lambda s: None)
        _RUN["path"] = out / "metrics.json"
    return _RUN["path"], json.loads(_RUN["path"].read_text())


def test_a_real_runs_record_validates_and_reads_typed(run_doc):
    path, doc = run_doc
    record = read_record(path)
    assert isinstance(record, RunRecord) and record.schema_version == SCHEMA_VERSION
    assert record.model == doc["model"] and record.trainable_params == doc["trainable_params"]
    assert record.fedtune.peft == "lora" and record.fedtune.artifact == "adapter"
    assert [r.round for r in record.rounds] == [0, 1] and record.site_names() == ["financial", "medical"]
    one = record.rounds[1]
    assert one.trained and not record.rounds[0].trained
    for name in ("medical", "financial"):
        site, raw = one.sites[name], doc["rounds"][1]["sites"][name]
        assert site.status == "ok" and site.steps == raw["steps"] == 2 and site.bytes_sent == raw["bytes_sent"]
        assert site.eval_loss == raw["eval_loss"] and site.cosine_to_aggregate == raw["cosine_to_aggregate"]
        assert set(site.by_layer) == set(raw["by_layer"])
    assert one.sites["financial"].rank == 2 and one.sites["medical"].rank is None
    assert one.aggregate.eval_loss == doc["rounds"][1]["aggregate"]["eval_loss"]
    assert one.layer_change == doc["rounds"][1]["layer_change"]
    assert record.best is not None and record.best.metric == "eval_loss"
    assert record.setting("federation", "rounds") == 1 and record.setting("nothing", "x", 7) == 7


def test_write_record_writes_the_same_json_with_its_version_first(run_doc, tmp_path):
    _, doc = run_doc
    doc.pop("schema_version", None)
    out = tmp_path / "metrics.json"
    write_record(out, doc)
    assert out.read_text() == json.dumps({"schema_version": SCHEMA_VERSION, **doc}, indent=2) + "\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = tmp_path / "again.json"
    write_record(again, json.loads(out.read_text()))  # a versioned document is written as it is
    assert again.read_text() == out.read_text()


def test_an_unversioned_record_of_an_earlier_release_is_read_as_version_1(run_doc, tmp_path):
    """ftserver --resume on a run made by the previous version: its metrics.json has no schema_version."""
    _, doc = run_doc
    doc.pop("schema_version", None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc, indent=2))
    record = read_record(old)
    assert record.schema_version == 1 and len(record.rounds) == len(doc["rounds"])


@pytest.mark.parametrize("version", [2, 99, 0, "1", 1.0, True, None])  # null is not the absent key
def test_an_unknown_schema_version_is_refused_by_name(run_doc, tmp_path, version):
    _, doc = run_doc
    doc["schema_version"] = version
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(
        RecordError, match=rf"metrics.json: schema_version {version!r}: this fedtune reads .* schema_version 1"
    ):
        read_record(path)


@pytest.mark.parametrize(
    "change, where, what",
    [
        (
            lambda d: d["rounds"][1]["sites"]["medical"].update(steps="2"),
            r"rounds\[1\]\.sites\.medical\.steps",
            "integer",
        ),
        (lambda d: d.update(trainable_params=4096.0), r"trainable_params", "integer"),
        (lambda d: d["fedtune"].update(secure_aggregation=1), r"fedtune\.secure_aggregation", "boolean"),
        (lambda d: d["rounds"][0]["aggregate"].update(eval_loss="low"), r"rounds\[0\]\.aggregate\.eval_loss", "number"),
        (
            lambda d: d["rounds"][1]["sites"]["medical"].update(grade="A"),
            r"rounds\[1\]\.sites\.medical\.grade",
            "Extra",
        ),
        (lambda d: d.pop("rounds"), r"rounds: Field required", ""),
        (lambda d: d["fedtune"].update(artifact="zip"), r"fedtune\.artifact", "adapter"),
    ],
)
def test_a_wrong_document_is_refused_naming_the_key_and_nothing_is_written(run_doc, tmp_path, change, where, what):
    _, doc = run_doc
    bad = copy.deepcopy(doc)
    change(bad)
    with pytest.raises(RecordError, match=where) as e:
        validate_record(bad)
    assert what in str(e.value)
    path = tmp_path / "metrics.json"
    path.write_text("before")
    with pytest.raises(RecordError, match=where):
        write_record(path, bad)
    assert path.read_text() == "before"  # refused before anything was written
    path.write_text(json.dumps(bad))
    with pytest.raises(RecordError, match=rf"{path}: not a valid run record: .*{where}"):
        read_record(path)


def test_unreadable_records_are_refused_with_the_path(tmp_path):
    with pytest.raises(RecordError, match=r"missing.json: cannot read"):
        read_record(tmp_path / "missing.json")
    (tmp_path / "torn.json").write_text('{"rounds": [')
    with pytest.raises(RecordError, match=r"torn.json: the run record is not JSON"):
        read_record(tmp_path / "torn.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(RecordError, match=r"list.json: not a valid run record: a JSON object was expected"):
        read_record(tmp_path / "list.json")


def test_round_kinds():
    base = RoundRecord.model_validate({"round": 0, "sites": {"a": {"eval_loss": 1.0}}, "seconds": 0.1})
    skipped = RoundRecord.model_validate(
        {"round": 2, "skipped": "too few sites drawn", "privacy": {"epsilon": 0.5}, "sites": {}, "aggregate": {}}
    )
    trained = RoundRecord.model_validate({"round": 1, "sites": {}, "seconds": 1.0, "accepted": 2})
    assert not base.trained and not skipped.trained and trained.trained
    assert skipped.privacy.epsilon == 0.5 and skipped.privacy.noise_multiplier is None
    assert base.sites["a"].status is None and base.aggregate.eval_loss is None
