"""ftserver and ftclient as a coordinator and sites run them: separate processes on localhost,
TLS with freshly made certificates, site keys, the tiny model.

- two registered sites complete two rounds and leave a loadable adapter; a third site with an
  unregistered key is refused and told why; no site record reaches the coordinator's output;
- a site killed mid-round: the round completes with the others (min_sites 2);
- (the coordinator killed with SIGKILL mid-run, then ``ftserver --resume``, is played in
  test_gateway.py, on the same federation as the attack on the public port.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.client.keys import create_site_keys
from fedtune.common.checkpoint import verify_checkpoint
from fedtune.common.procs import free_port
from fedtune.server.certs import create_certificates

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "simulations" / "data"
BIN = Path(sys.executable).parent
SECRET = "PATIENT-SECRET-4711"


class Federation:
    """Certificates, keys, a run config, and every process a test starts (all stopped at the end)."""

    def __init__(self, tmp: Path, model_dir: Path, **federation):
        self.tmp = tmp
        self.model_dir = model_dir
        self.pki = tmp / "pki"
        create_certificates(self.pki, ["localhost"], days=1)
        self.authorized = tmp / "authorized"
        self.authorized.mkdir()
        self.port = free_port()
        self.out = tmp / "run"
        self.procs: list[subprocess.Popen] = []
        fed = {
            "rounds": 2,
            "min_sites": 2,
            "expected_sites": 2,
            "join_timeout_s": 90,
            "round_timeout_s": 90,
            **federation,
        }
        self.rounds = fed["rounds"]
        self.config = tmp / "run.json"
        self.config.write_text(
            json.dumps(
                {
                    "model": {"name": str(model_dir)},
                    "peft": {"r": 4, "alpha": 8},
                    "data": {"max_length": 256},
                    "train": {"local_steps": 3, "batch_size": 4, "lr": 0.01},
                    "eval": {"max_examples": 8, "batch_size": 8, "max_new_tokens": 3},
                    "federation": fed,
                    "output": {"plots": False},
                }
            )
        )

    def site_key(self, name: str, register: bool = True) -> Path:
        priv, pub = create_site_keys(self.tmp / "keys" / name)
        if register:
            (self.authorized / f"{name}.pub").write_bytes(pub.read_bytes())
        return priv

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def server(self, *extra: str, log: str = "server.out") -> subprocess.Popen:
        args = ["--config", str(self.config), "--out", str(self.out)] if "--resume" not in extra else []
        cmd = [
            str(BIN / "ftserver"),
            *args,
            "--certs",
            str(self.pki),
            "--authorized-keys",
            str(self.authorized),
            "--port",
            str(self.port),
            *extra,
        ]
        return self._spawn(cmd, self.tmp / log)

    def site(self, name: str, key: Path, data: Path) -> subprocess.Popen:
        cmd = [
            str(BIN / "ftclient"),
            "--server", f"localhost:{self.port}",
            "--data", str(data),
            "--name", name,
            "--ca-cert", str(self.pki / "ca.crt"),
            "--key", str(key),
            "--threads", "1",
            "--work-dir", str(self.tmp / "work" / name),
            "--model-root", str(self.model_dir),  # the run's tiny model: outside a site's own folders, so named here
        ]  # fmt: skip
        return self._spawn(cmd, self.tmp / f"{name}.out")

    def text(self, name: str) -> str:
        p = self.tmp / name
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_for(self, name: str, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while needle not in self.text(name):
            if time.time() > deadline:
                raise AssertionError(f"{needle!r} not in {name} after {timeout:.0f} s:\n{self.text(name)[-3000:]}")
            time.sleep(0.2)

    def two_sites_one_round_in(self) -> tuple[subprocess.Popen, dict[str, Path]]:
        """ftserver with registered sites alpha (medical) and beta (legal), once round 1 is done.
        -> (the ftserver process, each site's private key)."""
        keys = {n: self.site_key(n) for n in ("alpha", "beta")}
        server = self.server()
        self.wait_for("server.out", "site key registered: beta", 60)
        self.site("alpha", keys["alpha"], DATA / "medical" / "train.jsonl")
        self.site("beta", keys["beta"], DATA / "legal" / "train.jsonl")
        self.wait_for("server.out", f"round 1/{self.rounds} done", 180)
        return server, keys

    def finish(self, proc: subprocess.Popen, timeout: float, log: str = "server.out") -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.text(log)[-4000:]}") from None

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def federation(tmp_path, tiny_model_dir):
    made: list[Federation] = []

    def make(**kw) -> Federation:
        f = Federation(tmp_path, tiny_model_dir, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop_all()


def _rounds(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def test_registered_sites_train_two_rounds_and_an_unregistered_site_is_refused(federation, tiny_model_dir, tmp_path):
    fed = federation()
    medical = tmp_path / "medical.jsonl"
    lines = (DATA / "medical" / "train.jsonl").read_text().splitlines()
    medical.write_text(
        "\n".join(
            [
                *lines[:60],
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Triage {SECRET}."},
                            {"role": "assistant", "content": "routine"},
                        ]
                    }
                ),
            ]
        )
        + "\n"
    )
    alpha, beta, mallory = fed.site_key("alpha"), fed.site_key("beta"), fed.site_key("mallory", register=False)
    server = fed.server()
    fed.wait_for("server.out", "site key registered: beta", 60)
    fed.site("alpha", alpha, medical)
    fed.site("beta", beta, DATA / "legal" / "train.jsonl")
    intruder = fed.site("mallory", mallory, DATA / "financial" / "train.jsonl")

    assert fed.finish(intruder, 90, "mallory.out") == 3
    said = fed.text("mallory.out")
    assert "REFUSED by the coordinator" in said and "not registered" in said and "--authorized-keys" in said

    # A site that trusts another CA does not talk to this server, and is told why.
    create_certificates(tmp_path / "other-pki", ["localhost"], days=1)
    cmd = [str(BIN / "ftclient"), "--server", f"localhost:{fed.port}", "--data", str(DATA / "legal" / "train.jsonl")]
    cmd += [
        "--ca-cert",
        str(tmp_path / "other-pki" / "ca.crt"),
        "--key",
        str(mallory),
        "--work-dir",
        str(tmp_path / "work" / "eve"),
    ]
    eve = fed._spawn(cmd, tmp_path / "eve.out")
    assert fed.finish(eve, 90, "eve.out") == 1
    assert "TLS: the server at" in fed.text("eve.out") and "does not vouch for" in fed.text("eve.out")

    # A key dropped into --authorized-keys while the server runs is registered.
    (fed.authorized / "mallory.pub").write_bytes((mallory.parent / "site_key.pub").read_bytes())
    fed.wait_for("server.out", "site key registered: mallory", 30)

    assert fed.finish(server, 240) == 0, fed.text("server.out")[-4000:]
    out = fed.text("server.out")
    assert "round 2/2 done" in out
    rounds = _rounds(fed.out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["accepted"] == 2
        assert {n: s["status"] for n, s in r["sites"].items()} == {"alpha": "ok", "beta": "ok"}
        # Secure aggregation is on by default: every stage with both sites, 4 bytes a value uploaded (and 4 for the weight).
        st = r["secure_aggregation"]
        assert st["sites_per_stage"] == [2, 2, 2, 2, 2, 2] and st["threshold"] == 2
        assert 4.0 < st["upload_bytes_per_param"] < 4.01
        assert 0 < st["quantization_error_bound"] < 1e-6
        assert all(s["startup_seconds"] is not None and s["startup_seconds"] < 30 for s in r["sites"].values())
    assert rounds[2]["aggregate"]["eval_loss"] < rounds[0]["aggregate"]["eval_loss"]
    assert json.loads((fed.out / "run-status.json").read_text())["status"] == "completed"

    # The adapter is a verified PEFT folder that loads onto the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert verify_checkpoint(fed.out / "adapter") is None
    assert verify_checkpoint(fed.out / "checkpoints" / "round-0002") is None
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), fed.out / "adapter")
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) > 0

    # Only counts and metrics left the sites: no record text anywhere in the coordinator's output.
    for f in fed.out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".log", ".txt", ""):
            assert SECRET not in f.read_text(errors="replace"), f
    assert SECRET not in out


def test_site_killed_mid_round(federation):
    # (With min_sites above the sites left, secure aggregation aborts the round and releases
    # nothing: test_secure_rounds.py::test_three_dropouts_abort_the_round_and_release_nothing
    # through the real handlers, and ftserver's failed-run message in unit/test_gateway.py. A
    # second real federation for it here cost CI a minute and a half.)
    # Long enough rounds (150 steps, ~4 s) to kill a site while it trains; a dead site is noticed
    # when Flower's heartbeat lapses or round_timeout_s passes, whichever is first.
    fed = federation(rounds=2, min_sites=2, expected_sites=3, round_timeout_s=25)
    cfg = json.loads(fed.config.read_text())
    cfg["train"]["local_steps"] = 150
    fed.config.write_text(json.dumps(cfg))
    keys = {n: fed.site_key(n) for n in ("alpha", "beta", "gamma")}
    server = fed.server()
    fed.wait_for("server.out", "site key registered: gamma", 60)
    fed.site("alpha", keys["alpha"], DATA / "medical" / "train.jsonl")
    fed.site("beta", keys["beta"], DATA / "legal" / "train.jsonl")
    gamma = fed.site("gamma", keys["gamma"], DATA / "financial" / "train.jsonl")
    fed.wait_for("gamma.out", "round 1: step", 180)
    os.killpg(gamma.pid, signal.SIGKILL)  # ftclient and nothing else of it: its SuperNode dies with it

    code = fed.finish(server, 240)
    out = fed.text("server.out")
    assert code == 0, out[-4000:]
    rounds = _rounds(fed.out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    r1 = rounds[1]
    assert r1["accepted"] == 2 and r1["sites"]["alpha"]["status"] == "ok" and r1["sites"]["beta"]["status"] == "ok"
    assert r1["sites"].get("gamma", {}).get("status", "missing") != "ok"
    # Not asked to train again once gone. (Flower lists a dead node until its heartbeat lapses,
    # about a minute; if round 2 starts before that, gamma is asked again, fails when the
    # heartbeat lapses, and is recorded as failed.)
    g2 = rounds[2]["sites"].get("gamma", {})
    assert "train_loss" not in g2 and g2.get("eval_status", "error") == "error"
    assert rounds[2]["accepted"] == 2


def test_deployed_sites_keep_their_private_part_in_their_own_work_folder(
    federation, tiny_model_dir, holds_no_private_row
):
    """ftserver and two ftclient processes with dual personalization: every round records each
    site's personalized scores; each site's private part and personalized model are in its own
    --work-dir (a PEFT folder the base model loads); no file the coordinator wrote holds a byte
    row of either site's private adapter. (Resuming from the newest private round on disk, after a
    replay or a missed round, is played through the real handlers in
    unit/test_personal.py::test_the_private_part_survives_a_replay_and_a_missed_round.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.client.join import SITE_STATE

    fed = federation(personalization="dual", personal_steps=2)
    server, _ = fed.two_sites_one_round_in()
    assert fed.finish(server, 240) == 0, fed.text("server.out")[-4000:]
    rounds = _rounds(fed.out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        for name in ("alpha", "beta"):
            s = r["sites"][name]
            assert s["personal_eval_loss"] is not None and s["personal_steps"] == 2, s
    private = []
    for name in ("alpha", "beta"):
        state = fed.tmp / "work" / name / SITE_STATE
        assert verify_checkpoint(state / "private" / "round-0002") is None
        private.append(state / "private" / "round-0002")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), state / "personalized")
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    assert not list(fed.out.rglob("private*")) and not list(fed.out.rglob("personalized"))
    holds_no_private_row(private, fed.out)
