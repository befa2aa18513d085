"""What a new user meets (issue 22): one tolerance and one verdict on data in every tool, unusable
sites refused before anything loads and named with their reason, one exit-code table, a
finished run that knows it is finished, and a thread count that suits the cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client import app as client_app
from fedtune.client import cli as ftclient
from fedtune.common import exits, fteval, threads
from fedtune.common.config import load_config
from fedtune.server import app as server
from fedtune.simulations import cli as ftsim

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture: every test starts with no cached model)
from .test_methods import real_sites
from .test_server_rounds import _task_identity  # noqa: F401  (fixture)

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data"
SECRET = "PATIENT-SECRET-0815"


class Started(BaseException):
    """Raised by a stand-in for ftsim's federation: it would have started."""


@pytest.fixture(autouse=True)
def torch_threads():
    """The commands set torch's thread count for their process; give the test process its own back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def three_bad_of_180(tmp_path: Path) -> Path:
    """The legal site's 180 records with 3 of them broken (one holding a secret)."""
    lines = (DATA / "legal" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 180
    for i in (5, 50, 100):
        lines[i] = json.dumps({"messages": SECRET})
    path = tmp_path / "legal-3-bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_check_fteval_and_ftsim_give_one_verdict_at_one_tolerance(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """3 bad records of 180: ftclient check said 'usable' (exit 0) at a tolerance of 1.0 while
    fteval refused the file. Now every tool refuses it at the default tolerance, names the flag
    its user sets and the least value that would skip them, and all accept it at that value."""
    bad = three_bad_of_180(tmp_path)
    model = ["--model", str(tiny_model_dir)]
    assert ftclient.main(["check", "--data", str(bad), *model]) == exits.BAD_INPUT
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict"))
    assert "NOT usable: 3 of 180 records unusable" in verdict and "--max-invalid-fraction 0.017" in verdict
    assert "line 6" in out and SECRET not in out  # where each problem is, never what it holds

    assert fteval.main(["--data", str(bad), *model, "--no-generate"]) == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert "3 of 180 records unusable" in err and "--max-invalid-fraction 0.017" in err and SECRET not in err

    monkeypatch.setattr(ftsim, "run", lambda *a, **k: pytest.fail("ftsim started with a site it cannot use"))
    site = ["--site", f"legal={bad}", *model, "--out", str(tmp_path / "run")]
    assert ftsim.main(site) == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert "ftsim: site legal:" in err and "--max-invalid-fraction 0.017" in err and SECRET not in err

    # At the value they name, the three tools agree the other way.
    allow = ["--max-invalid-fraction", "0.017"]
    assert ftclient.main(["check", "--data", str(bad), *model, *allow]) == exits.OK
    assert "usable: 3 of 180 records will be skipped" in capsys.readouterr().out
    assert ftsim.refuse_unusable_sites(ftsim.resolve_config(ftsim.build_parser().parse_args([*site, *allow]))) is None


def test_check_says_not_usable_with_exit_2_for_every_kind_of_unusable_file(tmp_path, tiny_model_dir, capsys):
    """ftclient --help says bad data exits 2; check exited 1 on an all-invalid file, 2 on an empty one."""
    empty, invalid, good = tmp_path / "empty.jsonl", tmp_path / "invalid.jsonl", DATA / "legal" / "train.jsonl"
    empty.write_text("")
    invalid.write_text('{"x": 1}\n{"y": 2}\n')
    model = ["--model", str(tiny_model_dir)]
    assert ftclient.main(["check", "--data", str(empty), *model]) == exits.BAD_INPUT
    assert ftclient.main(["check", "--data", str(invalid), *model]) == exits.BAD_INPUT
    assert "NOT usable: all 2 records unusable" in capsys.readouterr().out
    # every answer cut away at --max-length 8: nothing to train on
    assert ftclient.main(["check", "--data", str(good), *model, "--max-length", "8"]) == exits.BAD_INPUT
    assert "NOT usable: no example keeps part of its answer" in capsys.readouterr().out
    assert ftclient.main(["check", "--data", str(good), *model]) == exits.OK
    assert capsys.readouterr().out.splitlines()[-1] == "verdict         usable"


def test_ftsim_refuses_unusable_sites_before_it_provisions_a_model(tmp_path, capsys, monkeypatch):
    """An empty site file: ftsim ran 158 s and said 'no site evaluated' with no reason. Every bad
    site is named with its file's reason, and nothing (model, Ray, output folder) is started."""
    from fedtune.common import modeling

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    monkeypatch.setattr(modeling, "resolve_model_source", lambda *a: pytest.fail("a model was provisioned"))
    monkeypatch.setattr(ftsim, "start_ray", lambda: pytest.fail("Ray was started"))
    out = tmp_path / "run"
    argv = ["--site", f"x={empty}", "--site", f"legal={DATA / 'legal' / 'train.jsonl'}", "--out", str(out)]
    assert ftsim.main(argv) == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert f"ftsim: site x: {empty}: empty file, no records" in err and "1 of 2 sites" in err
    assert "site legal" not in err and not out.exists()


@pytest.mark.usefixtures("_task_identity")
def test_a_site_that_sends_nothing_is_explained_on_ftsims_console_only(tmp_path, tiny_config):
    """A site whose file breaks after the start: the coordinator's lines said 'no update
    (data-error)' and 'no site evaluated'. ftsim, which plays the site, adds the file's reason;
    a deployment's coordinator (no explain_site) still gets only the category."""
    grid, files = real_sites(("medical", "financial"))
    broken = tmp_path / "financial.jsonl"
    broken.write_text("")
    files[1] = client_app.SiteFiles("financial", str(broken), None)
    data = json.loads(tiny_config.to_json())
    data["federation"].update(rounds=1, sites=[{"name": f.name, "train": f.train, "eval": f.eval} for f in files])
    data["eval"]["forgetting"] = False
    cfg = load_config(None, base=data)
    for explain, out in ((ftsim.SiteExplainer(cfg), tmp_path / "sim"), (None, tmp_path / "deploy")):
        said: list[str] = []
        client_app._RUNTIME, client_app._SITE_CACHE = None, {}
        server.run_federation(grid, cfg, out, said.append, explain_site=explain)
        trained = next(s for s in said if "round 1/1 train | financial" in s)
        evaluated = next(s for s in said if s.startswith("round 1 eval"))
        if explain is not None:
            assert f"no update (data-error: {broken}: empty file, no records)" in trained
            assert f"financial: not evaluated (data-error: {broken}: empty file" in evaluated
            assert explain.explained == {"financial"}
        else:
            assert "no update (data-error) " in trained and str(broken) not in "\n".join(said)
            assert "financial: not evaluated (data-error)" in evaluated
        assert "medical: loss" in evaluated


@pytest.mark.usefixtures("_task_identity")
def test_a_finished_run_resumed_says_so_and_runs_nothing(tmp_path, tiny_config, capsys, monkeypatch):
    """--resume of a finished run printed 'rounds 4..3 to go', scored the models again and added
    that time to the report's wall time. Now it says it is finished and starts nothing, unless
    --rounds extends it; the wall time is fixed when the run finished."""
    grid, files = real_sites(("medical", "financial"))
    data = json.loads(tiny_config.to_json())
    data["federation"].update(rounds=1, sites=[{"name": f.name, "train": f.train, "eval": f.eval} for f in files])
    data["eval"]["forgetting"] = False
    cfg = load_config(None, base=data)
    out = tmp_path / "run"
    rs = server.run_federation(grid, cfg, out, lambda s: None)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["finished"] is True and doc["elapsed_s"] == rs.history.finished_s
    assert f"wall time: {doc['elapsed_s']:.0f} s" in (out / "report.md").read_text()

    started: list[dict] = []

    def federation(cfg, out, say, **kw):
        started.append(kw)
        raise Started

    monkeypatch.setattr(ftsim, "run", federation)
    assert ftsim.main(["--resume", str(out)]) == exits.OK
    said = capsys.readouterr().out
    assert f"{out} is finished (1 of 1 rounds run; {doc['elapsed_s']:.0f} s)" in said and "--rounds N (N > 1)" in said
    assert started == [] and json.loads((out / "metrics.json").read_text()) == doc  # nothing run, nothing rewritten
    with pytest.raises(Started):
        ftsim.main(["--resume", str(out), "--rounds", "2"])  # extends it: the federation starts
    assert started and started[0]["resume"] is True

    # ftserver --resume of the same finished run: said, and no child (SuperLink, ServerApp) started.
    from fedtune.server import cli as ftserver

    (out / ftserver.CONFIG_JSON).write_text(cfg.to_json())
    (out / ftserver.SERVER_JSON).write_text(json.dumps({"host": None, "port": None, "insecure": True, "certs": None,
                                                        "authorized_keys": None, "max_message_mb": None}))  # fmt: skip
    monkeypatch.setattr(ftserver, "run_children", lambda co: pytest.fail("ftserver started its children"))
    assert ftserver.main(["--resume", str(out)]) == exits.OK
    assert f"ftserver: {out.resolve()} is finished (1 of 1 rounds run" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text()) == doc


@pytest.mark.parametrize(
    "command",
    [
        lambda: ftsim.main(["--help"]),
        lambda: fteval.main(["--help"]),
        lambda: ftclient.main(["--help"]),
        lambda: ftclient.main(["check", "--help"]),
        lambda: __import__("fedtune.server.cli", fromlist=["main"]).main(["--help"]),
    ],
    ids=["ftsim", "fteval", "ftclient", "ftclient check", "ftserver"],
)
def test_every_command_shows_the_one_exit_code_table(command, capsys):
    try:
        assert command() == exits.OK
    except SystemExit as e:  # argparse's --help
        assert e.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert exits.HEAD in shown
    for code, meaning in exits.TABLE:
        assert f"{code} {' '.join(meaning.split())}" in shown


def test_ftsim_help_shows_the_defaults_and_what_the_demo_sets(capsys):
    """ftsim's help hid what --rounds, --local-steps and --lr are when no config is given (--lr
    said 'the method's, see DEFAULT_LR'). Each flag's help gives its default, and the built-in
    demo's value where it differs; fteval's flags show theirs."""
    with pytest.raises(SystemExit):
        ftsim.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())

    def help_of(flag: str) -> str:  # the option's entry: after the usage line and any help that names it
        part = shown[shown.rindex(f" {flag} ") :]
        return part[: part.index("]") + 1]

    assert "[federation.rounds; default 3]" in help_of("--rounds")
    assert "[train.local_steps; default 10]" in help_of("--local-steps")
    assert "lora 0.0002" in help_of("--lr") and "[train.lr; the demo: 0.001]" in help_of("--lr")
    assert "[data.max_length; default 512; the demo: 256]" in help_of("--max-length")
    with pytest.raises(SystemExit):
        fteval.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, said in (("--format", "default: auto"), ("--max-length", "default: 1024"), ("--batch-size", "default: 8"),
                       ("--max-new-tokens", "default: 32"), ("--device", "default: auto"), ("--threads", "busy")):  # fmt: skip
        assert said in shown[shown.rindex(f" {flag} ") :][:300], flag


def test_default_threads_leave_busy_cores_to_their_work(tmp_path, monkeypatch):
    assert threads.default_threads(cores=2, busy=0.0) == 2
    assert threads.default_threads(cores=2, busy=0.2) == 2
    assert threads.default_threads(cores=2, busy=1.0) == 1  # another job on one core
    assert threads.default_threads(cores=2, busy=2.0) == 1  # every core busy: one thread, never none
    assert threads.default_threads(cores=16, busy=4.0) == 12
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads.usable_cores() == 8  # no quota file
    quota.write_text("max 100000\n")
    assert threads.usable_cores() == 8
    quota.write_text("300000 100000\n")  # a 3-CPU container on an 8-CPU host
    assert threads.usable_cores() == 3
    stat = tmp_path / "stat"
    monkeypatch.setattr(threads, "PROC_STAT", stat)
    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  150 0 150 900 0 0 0 0 0 0\n"])  # 100 busy, 100 idle
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    assert threads.busy_cores(3) == pytest.approx(1.5)  # the machine half busy: half of ours taken as busy


def test_fteval_takes_threads_and_refuses_none(tiny_model_dir, capsys):
    assert fteval.main(["--data", str(DATA / "legal" / "eval.jsonl"), "--threads", "0"]) == exits.BAD_INPUT
    assert "--threads 0: expected at least 1" in capsys.readouterr().err
    args = ["--data", str(DATA / "legal" / "eval.jsonl"), "--model", str(tiny_model_dir), "--no-generate"]
    assert fteval.main([*args, "--max-examples", "2", "--threads", "1"]) == exits.OK
    assert "threads         1\n" in capsys.readouterr().out


def test_a_wait_for_another_process_provisioning_the_model_is_said(tmp_path, capsys):
    """A first run on a shared machine waited silently while another process converted the
    default model; a wait longer than a moment is now said, and an uncontended lock says nothing."""
    import fcntl
    import threading
    import time

    from fedtune.common import modeling

    lock = tmp_path / ".provision.lock"
    with modeling._file_lock(lock, "the default model"):
        pass
    assert capsys.readouterr().err == ""
    entered = threading.Event()

    def provision() -> None:
        with modeling._file_lock(lock, "the default model", quiet_s=0.2):
            entered.set()

    with open(lock, "w") as other:  # another process's hold: flock conflicts across open files
        fcntl.flock(other, fcntl.LOCK_EX)
        t = threading.Thread(target=provision)
        t.start()
        time.sleep(0.6)
        assert not entered.is_set()
        fcntl.flock(other, fcntl.LOCK_UN)
    t.join(10)
    assert entered.is_set()
    err = capsys.readouterr().err
    assert "waiting for another process to finish preparing the default model" in err and "is ready" in err


def test_the_user_guides_exit_code_table_is_the_commands_table():
    guide = (Path(__file__).resolve().parents[2] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    part = guide[guide.index("## Exit codes") :]
    rows = [line.split(" | ") for line in part.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert [(int(code.strip("| ")), text.rstrip(" |").replace("`", "")) for code, text in rows] == list(exits.TABLE)


def test_ftclient_join_warns_of_a_file_above_the_default_tolerance(tmp_path, capsys):
    """A site's data is checked before it connects; the coordinator's tolerance decides later, so
    a file the default would refuse gets a warning that names the flag's rule (and no record)."""
    from fedtune.client.join import JoinError, check_inputs, join_parser

    bad = three_bad_of_180(tmp_path)
    args = join_parser().parse_args(["--server", "localhost:9", "--data", str(bad), "--insecure"])
    check_inputs(args)
    err = capsys.readouterr().err
    assert "ftclient: warning: --data" in err and "3 of 180 records unusable" in err and SECRET not in err
    check_inputs(
        join_parser().parse_args(["--server", "localhost:9", "--data", str(DATA / "legal/train.jsonl"), "--insecure"])
    )
    assert capsys.readouterr().err == ""
    with pytest.raises(JoinError, match="--threads 0: expected at least 1"):
        check_inputs(join_parser().parse_args(["--server", "h:9", "--data", str(bad), "--insecure", "--threads", "0"]))


def test_importing_fedtune_keeps_bitsandbytes_from_fetching_a_kernel_from_the_hub():
    """transformers >= 5.25 brings the ``kernels`` package; bitsandbytes (imported by peft) then
    asks the hub for a CPU kernel at import on an AVX512-BF16 CPU, a download nobody named (seen
    in a fresh clone's test run: 'Skipping publisher trust check for kernels-community/...'). In a
    clean process, hub not disabled, fedtune's import leaves ``kernels`` unimportable."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, fedtune.common, peft\n"
        "try:\n    import bitsandbytes\nexcept ImportError:\n    pass\n"
        "import transformers.utils.import_utils as iu\n"
        "print(sys.modules.get('kernels') is None, iu.is_kernels_available())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "False"] and "kernels-community" not in res.stderr
