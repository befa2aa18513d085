"""ftsim tune (simulations/tune.py): a study over real federations of the tiny model, run in
process through the real ClientApp handlers (the real-process path, Ray and a kill -9, is in
integration/test_ftsim.py): a study completes and hands back a config that loads; a pruned
trial stops after the round the pruner saw; a study stopped mid-trial resumes without training
a round twice; the search space is checked against the schema, naming the key."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import yaml

from fedtune.common import exits, messages
from fedtune.common.config import load_config
from fedtune.server import app as server
from fedtune.simulations import tune

from .test_methods import DATA_DIR, real_sites
from .test_server_rounds import _task_identity, server_round  # noqa: F401  (fixture: Flower's Message needs a task identity)

SITES = ("medical", "financial")


def study_file(tmp_path, tiny_config, space, **tune_settings) -> str:
    """A study config: the tiny model, two bundled sites, 2 rounds, and the tune section."""
    data = json.loads(tiny_config.to_json())
    data["train"].update({"local_steps": 2, "lr": 1e-2})
    data["eval"].update({"forgetting": False, "exact_match": False})
    data["federation"]["sites"] = [
        {"name": n, "train": str(DATA_DIR / n / "train.jsonl"), "eval": str(DATA_DIR / n / "eval.jsonl")} for n in SITES
    ]
    data["output"]["plots"] = False
    data["tune"] = {"space": space, "trials": 3, "pruner": "none", **tune_settings}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


class InProcess:
    """Runs each trial's federation over the real handlers in this process, and counts the
    rounds each trial folder trained."""

    def __init__(self, interrupt: tuple[str, int] | None = None):
        self.trained: list[tuple[str, int]] = []  # (trial folder, round), one per round trained and recorded
        self.calls: list[tuple[str, bool]] = []  # (trial folder, resumed)
        self.interrupt = interrupt  # (folder name, round): Ctrl-C while that round trains

    def __call__(self, cfg, out, say, resume, stop_after):
        self.calls.append((out.name, resume))
        grid = real_sites(SITES)[0]
        if self.interrupt is not None and self.interrupt[0] == out.name:
            push = grid.push_messages

            def push_or_stop(msgs):
                msgs = list(msgs)
                if any(
                    m.metadata.message_type == messages.TRAIN and server_round(m) == self.interrupt[1] for m in msgs
                ):
                    raise KeyboardInterrupt
                return push(msgs)

            grid.push_messages = push_or_stop
        counted = (self._count(out.name), *stop_after)  # counted first: the pruner may stop the round
        return server.run_federation(grid, cfg, out, say, resume, stop_after=counted)

    def _count(self, name):
        def condition(rs, rnd, population):
            self.trained.append((name, rnd))
            return None

        return condition


def load(out):
    return optuna.load_study(study_name="fedtune", storage=f"sqlite:///{out / tune.DB_FILE}")


def test_a_study_completes_and_hands_back_a_best_yaml_that_runs_as_a_config(tmp_path, tiny_config, capsys):
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}, "peft.r": [2, 4]}
    out = tmp_path / "study"
    cfg = study_file(tmp_path, tiny_config, space, sampler="random", keep=1)
    runs = InProcess()
    assert tune.main(["--config", cfg, "--out", str(out)], federate=runs) == exits.OK
    study = load(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len({t.params["train.lr"] for t in trials}) == 3
    assert trials[0].params == {"train.lr": 1e-2, "peft.r": 4}  # tune.include_config: the config's own values first
    best = min(trials, key=lambda t: t.value)
    # The objective is the federation's last-round metric, as the trial's own record has it.
    kept = out / "trials" / f"trial-{best.number:04d}"
    record = json.loads((kept / "metrics.json").read_text())
    assert best.value == pytest.approx(record["rounds"][-1]["aggregate"]["eval_loss"])
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    # tune.keep 1: the best trial's folder is kept, the others removed.
    assert sorted(p.name for p in (out / "trials").iterdir()) == [kept.name]
    # best.yaml is a config as it is: the best trial's parameters, no tune section, no output folder.
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.train.lr == pytest.approx(best.params["train.lr"]) and best_cfg.peft.r == best.params["peft.r"]
    assert best_cfg.tune.space == {} and best_cfg.output.dir is None
    assert [s.name for s in best_cfg.federation.sites] == list(SITES)
    from fedtune.server import cli as ftserver

    args = ftserver.build_parser().parse_args(["--config", str(out / "best.yaml"), "--out", str(tmp_path / "srv")])
    served, _, _ = ftserver.resolve(args)  # the coordinator's reading: sites' paths dropped, their count kept
    assert served.train.lr == best_cfg.train.lr and served.federation.expected_sites == 2
    assert served.secure_aggregation.enabled  # the trials ran without it (ftsim's default): ftserver's default stands
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"complete"}
    report = (out / "report.md").read_text()
    assert f"best: trial {best.number}, eval_loss {best.value:.4f}" in report
    printed = capsys.readouterr().out
    assert "trial 2 (3 of 3)" in printed and "3 of 3 finished" in printed and "round 2/2: eval_loss" in printed
    # Finished: a --resume runs nothing more, --trials raises the budget.
    assert tune.main(["--resume", str(out)], federate=runs) == exits.OK and len(runs.calls) == 3
    assert tune.main(["--resume", str(out), "--trials", "4"], federate=runs) == exits.OK and len(runs.calls) == 4
    assert len(load(out).get_trials()) == 4


def test_a_pruned_trial_stops_after_the_round_the_pruner_saw(tmp_path, tiny_config):
    """Trial 0 learns (lr 1e-2), trial 1 cannot (lr 1e-9): the median pruner, after one finished
    trial, stops trial 1 after round 1 of 3, and its federation records no round after it."""
    out = tmp_path / "study"
    space = {"train.lr": {"type": "float", "low": 1e-9, "high": 1e-2, "log": True}}
    cfg = study_file(tmp_path, tiny_config, space, pruner="median", startup_trials=1, trials=2, keep_pruned=True)
    data = yaml.safe_load(open(cfg))
    data["federation"]["rounds"] = 3
    open(cfg, "w").write(yaml.safe_dump(data))
    out.mkdir()
    study = optuna.create_study(study_name="fedtune", storage=f"sqlite:///{out / tune.DB_FILE}")
    study.enqueue_trial({"train.lr": 1e-2})
    study.enqueue_trial({"train.lr": 1e-9})
    runs = InProcess()
    assert tune.main(["--config", cfg, "--out", str(out)], federate=runs) == exits.OK
    first, second = load(out).get_trials()
    assert first.state == optuna.trial.TrialState.COMPLETE and second.state == optuna.trial.TrialState.PRUNED
    record = json.loads((out / "trials" / "trial-0001" / "metrics.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1]
    assert record["stopped"].startswith("pruned by the study (MedianPruner) after round 1")
    assert second.intermediate_values == {1: pytest.approx(record["rounds"][1]["aggregate"]["eval_loss"])}
    assert [r for n, r in runs.trained if n == "trial-0001"] == [1]
    assert second.intermediate_values[1] > first.intermediate_values[1]
    assert "pruning saved" in (out / "report.md").read_text()


def test_a_study_stopped_mid_trial_resumes_it_from_its_checkpoint_and_trains_no_round_twice(
    tmp_path, tiny_config, monkeypatch
):
    out = tmp_path / "study"
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    cfg = study_file(tmp_path, tiny_config, space, sampler="random", trials=3)
    data = yaml.safe_load(open(cfg))
    data["federation"]["rounds"] = 3
    open(cfg, "w").write(yaml.safe_dump(data))
    monkeypatch.setattr(tune.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    first = InProcess(interrupt=("trial-0001", 3))
    with pytest.raises(SystemExit) as stopped:
        tune.main(["--config", cfg, "--out", str(out)], federate=first)
    assert stopped.value.code == exits.INTERRUPTED
    before = load(out).get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "FAIL"]
    done0 = (out / "trials" / "trial-0000" / "metrics.json").read_bytes()
    then = InProcess()
    assert tune.main(["--resume", str(out)], federate=then) == exits.OK
    after = load(out).get_trials()
    finished = [t for t in after if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    # Trial 1 goes on as trial 2, from its folder's last checkpoint (round 2's): round 3 alone is left.
    assert then.calls == [("trial-0001", True), ("trial-0003", False)]
    assert after[2].user_attrs[tune.RESUMES] == 1 and after[2].params == before[1].params
    trained = first.trained + then.trained
    assert [trained.count(("trial-0001", r)) for r in (1, 2, 3)] == [1, 1, 1], trained
    assert (out / "trials" / "trial-0000" / "metrics.json").read_bytes() == done0  # not trained again
    record = json.loads((out / "trials" / "trial-0001" / "metrics.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2, 3]
    assert after[2].intermediate_values.keys() == {1, 2, 3}


def test_a_killed_process_s_trial_is_continued_and_a_live_one_is_left_alone(tmp_path, tiny_config):
    """kill -9 leaves a trial RUNNING: --resume continues it when its process is gone, not when it
    still runs (another process of the same study, on this machine)."""
    import os
    import socket
    import subprocess
    import sys

    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    cfg = load_config(study_file(tmp_path, tiny_config, space))
    out = tmp_path / "study"
    study = tune.open_study(cfg, out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(gone.stdout), os.getpid()):
        t = study.ask()
        t.suggest_float("train.lr", 1e-3, 3e-2, log=True)
        t.set_user_attr(tune.FOLDER, str(out / "trials" / f"trial-{t.number:04d}"))
        t.set_user_attr(tune.HOST, socket.gethostname())
        t.set_user_attr(tune.PID, pid)
    assert tune.requeue_interrupted(study, out / "trials") == [0]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "RUNNING", "WAITING"]
    assert tune.requeue_interrupted(study, out / "trials") == []  # once


def test_a_trial_written_into_the_storage_outside_the_search_space_is_not_run(tmp_path, tiny_config, capsys):
    """Whoever can write a shared study's storage can enqueue trials, and Optuna uses an enqueued
    trial's values even out of range: each process runs only values its own search space allows."""
    out = tmp_path / "study"
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}, "peft.r": [2, 4]}
    cfg = study_file(tmp_path, tiny_config, space, trials=1, include_config=False)
    out.mkdir()
    hostile = optuna.create_study(study_name="fedtune", storage=f"sqlite:///{out / tune.DB_FILE}")
    hostile.enqueue_trial({"train.lr": 50.0, "peft.r": 4}, user_attrs={tune.RESUMES: "../../elsewhere"})
    hostile.enqueue_trial({"train.lr": 1e-2, "peft.r": 64})
    runs = InProcess()
    with pytest.warns(UserWarning, match="Fixed parameter train.lr with value 50.0 is out of range"):  # Optuna's own
        assert tune.main(["--config", cfg, "--out", str(out)], federate=runs) == exits.OK
    first, second, third = load(out).get_trials()
    assert first.state.name == second.state.name == "FAIL" and third.state.name == "COMPLETE"
    assert "train.lr 50.0" in first.user_attrs[tune.INVALID] and "'64' not in (2, 4)" in second.user_attrs[tune.INVALID]
    assert runs.calls == [("trial-0002", False)]  # neither hostile trial trained, nor named a folder
    assert (
        "trial 0 not run (recorded as failed): not run: outside the search space: train.lr 50.0"
        in capsys.readouterr().out
    )


def test_a_space_whose_every_combination_is_invalid_stops_instead_of_sampling_forever(tmp_path, tiny_config, capsys):
    """Each value alone makes a valid config, together they never do ('dual' stacks a LoRA, IA3 does not)."""
    space = {"federation.personalization": ["dual"], "peft.method": ["ia3"]}
    runs = InProcess()
    cfg = study_file(tmp_path, tiny_config, space, trials=2)
    assert tune.main(["--config", cfg, "--out", str(tmp_path / "s")], federate=runs) == exits.BAD_INPUT
    assert not runs.calls and len(load(tmp_path / "s").get_trials()) == 10
    printed = capsys.readouterr().out
    assert "stopping: 10 trials in a row did not make a valid config" in printed
    assert "federation.personalization 'dual' adds a private LoRA" in printed


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "tune.space.train.lrr: not a config key (did you mean train.lr?)"),
        ({"output.dir": ["a", "b"]}, "tune.space.output.dir: a study does not set it"),
        ({"peft.r": {"type": "int", "low": 0, "high": 8}}, "tune.space.peft.r: low 0 does not make a valid config: - peft.r:"),
        ({"peft.method": ["lora", "nosuch"]}, "tune.space.peft.method: choice 'nosuch' does not make a valid config"),
        ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-4}}, "tune.space.train.lr: float: give low < high"),
        ({"train.lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, "tune.space.train.lr: log: low must be above 0"),
        ({"peft.r": {"type": "categorical", "low": 1, "high": 2}}, "tune.space.peft.r: categorical: give choices"),
        ({}, "tune.space is empty"),
    ],
)  # fmt: skip
def test_the_search_space_is_checked_against_the_schema_naming_the_key(tmp_path, tiny_config, capsys, space, expected):
    runs = InProcess()
    code = tune.main(
        ["--config", study_file(tmp_path, tiny_config, space), "--out", str(tmp_path / "s")], federate=runs
    )
    assert code == exits.BAD_INPUT and not runs.calls
    assert expected in capsys.readouterr().err


def test_the_study_folder_never_holds_the_storage_password_and_a_resume_asks_for_it(tmp_path, tiny_config, capsys):
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    data = json.loads(load_config(study_file(tmp_path, tiny_config, space)).to_json())
    data["tune"]["storage"] = url = "postgresql://tuner:hunter2@db.example/studies"
    out = tmp_path / "study"
    out.mkdir()
    record = json.dumps(tune.study_record(load_config(None, base=data), url))
    assert "hunter2" not in record and "postgresql://tuner:***@db.example/studies" in record
    (out / tune.STUDY_FILE).write_text(record)
    assert tune.main(["--resume", str(out)], federate=InProcess()) == exits.BAD_INPUT
    assert "give its URL with the password: --storage URL" in capsys.readouterr().err


def test_a_process_that_joins_a_study_with_another_config_is_refused_naming_the_key(tmp_path, tiny_config):
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    cfg = load_config(study_file(tmp_path, tiny_config, space))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    data = json.loads(cfg.to_json())
    data["tune"]["storage"] = url
    tune.open_study(load_config(None, base=data), tmp_path / "a")
    data["train"]["local_steps"] = 5
    with pytest.raises(
        tune.ConfigError, match=r"was started with another config \(train.local_steps: 5 in this config, 2"
    ):
        tune.open_study(load_config(None, base=data), tmp_path / "b")
    data["train"]["local_steps"] = 2
    data["tune"]["trials"] = 40  # each process's own budget may differ
    assert tune.open_study(load_config(None, base=data), tmp_path / "b").study_name == "fedtune"
