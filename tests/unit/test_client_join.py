"""client/join.py: ftclient's join flow once its inputs are checked (test_cli.py covers those):
what it reads from the SuperNode's log (a refused key, a TLS failure, the lines its operator
sees) and how it ends (exit code and message), played with a stand-in SuperNode (a Python
child that prints Flower's lines and exits) and a stand-in executor, so no coordinator is needed."""

from __future__ import annotations

import json
import stat
import sys
import threading
from pathlib import Path

import pytest

from fedtune.client import join as join_mod
from fedtune.client import policy as policy_mod
from fedtune.client import worker
from fedtune.client.join import EXIT_REFUSED, NodeOutput, join_parser, node_exit

REFUSAL = "\x1b[91mERROR \x1b[0m:     Failed to activate SuperNode: [code: 2004] node not registered"
NOTICE = "WARNING :   EXPERIMENTAL: SuperExec authentication is on; this feature may change"
TLS_LINE = "E0000 ssl_transport_security.cc: Handshake failed: CERTIFICATE_VERIFY_FAILED"


def test_node_output_flags_a_refusal_and_a_tls_failure_and_stays_flagged():
    seen = NodeOutput()
    assert seen.read("INFO :      Starting Flower SuperNode") is None  # not for the operator
    assert (seen.refused, seen.tls) == (False, False)
    assert seen.read(REFUSAL) == "ERROR :     Failed to activate SuperNode: [code: 2004] node not registered"
    assert seen.refused and not seen.tls
    assert seen.read(TLS_LINE) == TLS_LINE  # shown although it is no ERROR line
    assert seen.read("INFO :      retrying") is None
    assert seen.refused and seen.tls  # a later quiet line clears neither


def test_node_output_shows_errors_and_warnings_but_not_flowers_secret_notice():
    seen = NodeOutput()
    assert seen.read("  WARNING :   connection lost, retrying  \n") == "WARNING :   connection lost, retrying"
    assert seen.read("ERROR :     boom") == "ERROR :     boom"
    assert seen.read(NOTICE) is None
    assert seen.read("Failed to activate SuperNode") is None and seen.refused  # either marker refuses


def test_node_exit_says_why_with_the_code(tmp_path):
    args = join_parser().parse_args(["--server", "coord:8000", "--data", "d", "--ca-cert", "ca.crt"])
    log = tmp_path / "supernode.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)))
    code, text = node_exit(args, NodeOutput(refused=True, tls=True), "k.pub, SHA256:abc", 1, log)
    assert code == EXIT_REFUSED == 3
    assert "REFUSED by the coordinator at coord:8000: this site's key (k.pub, SHA256:abc) is not registered" in text
    code, text = node_exit(args, NodeOutput(refused=True), "", 1, log)
    assert "this site's key is not registered" in text
    code, text = node_exit(args, NodeOutput(tls=True), "", 1, log)
    assert code == 1 and text.startswith("ftclient: TLS: the server at coord:8000") and "--ca-cert ca.crt" in text
    code, text = node_exit(args, NodeOutput(), "", -9, log)
    assert code == 1 and text.startswith(f"ftclient: the SuperNode exited (code -9); its log ({log}):\n")
    assert "line 19" in text and "line 4\n" not in text  # the log's tail, not all of it


class FakeExecutor:
    """Serves nothing; returns from serve() once stopped (as the real one does when the SuperNode exits)."""

    def __init__(self, address, handler, secret=None):
        self.address, self.secret, self.tasks_done = address, secret, 0
        self.stopped = threading.Event()

    def serve(self):
        assert self.stopped.wait(30), "the SuperNode's exit did not stop the executor"

    def stop(self):
        self.stopped.set()


@pytest.fixture
def fake_node(monkeypatch):
    """ftclient's join with the SuperNode replaced by a child that prints ``lines`` and exits with ``rc``."""
    started = {}
    real_spawn = join_mod.spawn

    def run(args: list[str], lines: list[str], rc: int = 1) -> int:
        script = f"import sys\nfor line in {lines!r}: print(line)\nsys.exit({rc})"

        def spawn(cmd, log, env=None):
            started.update(cmd=cmd, log=log)
            return real_spawn([sys.executable, "-c", script], log, env=env)

        monkeypatch.setattr(join_mod, "spawn", spawn)
        return join_mod.join(join_parser().parse_args(args))

    monkeypatch.setattr(worker, "ResidentExecutor", FakeExecutor)
    monkeypatch.setattr(join_mod, "sigterm_as_interrupt", lambda: None)  # pytest keeps its own SIGTERM
    monkeypatch.setattr(policy_mod, "install", lambda p: started.update(policy=p))  # not this process's policy
    run.started = started
    return run


@pytest.fixture
def site_data(tmp_path) -> Path:
    f = tmp_path / "site.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(4)))
    return f


def test_join_ends_refused_with_exit_3_naming_the_key(fake_node, site_data, tmp_path, capsys):
    from fedtune.client.keys import create_site_keys
    from fedtune.server.certs import create_certificates

    create_certificates(tmp_path / "pki", ["localhost"], days=1)
    key, pub = create_site_keys(tmp_path / "site")
    work = tmp_path / "work"
    args = ["--server", "127.0.0.1:9", "--data", str(site_data), "--ca-cert", str(tmp_path / "pki" / "ca.crt")]
    rc = fake_node([*args, "--key", str(key), "--work-dir", str(work)], ["INFO :      Starting", NOTICE, REFUSAL])
    err = capsys.readouterr().err
    assert rc == 3
    fingerprint = join_mod.key_fingerprint(pub.read_bytes())
    assert f"REFUSED by the coordinator at 127.0.0.1:9: this site's key ({pub}, {fingerprint})" in err
    assert f"site key ({pub}, {fingerprint})" in err and "(TLS)" in err and "WARNING: --insecure" not in err
    assert "SuperNode: ERROR :     Failed to activate SuperNode" in err  # relayed, without its colours
    assert "Starting" not in err and "EXPERIMENTAL" not in err
    cmd = fake_node.started["cmd"]
    assert cmd[cmd.index("--root-certificates") + 1] == str((tmp_path / "pki" / "ca.crt").resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--insecure" not in cmd
    secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
    assert secret == work.resolve() / "runtime.secret" and len(secret.read_bytes()) == 32
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(work.stat().st_mode) == 0o700
    assert fake_node.started["log"] == work.resolve() / "supernode.log"
    assert fake_node.started["policy"].describe()  # the site's policy was installed before the node started


def test_join_ends_with_the_supernodes_code_and_log_tail(fake_node, site_data, tmp_path, capsys):
    rc = fake_node(["--server", "127.0.0.1:9", "--data", str(site_data), "--insecure"], ["INFO : last words"], rc=5)
    err = capsys.readouterr().err
    assert rc == 1
    assert "WARNING: --insecure: TLS is OFF" in err and "(NO TLS)" in err and "site key (" not in err
    assert "ftclient: the SuperNode exited (code 5); its log (" in err and "INFO : last words" in err
    cmd = fake_node.started["cmd"]
    assert "--insecure" in cmd and "--root-certificates" not in cmd and "--auth-supernode-private-key" not in cmd


def test_join_ends_on_a_tls_failure_with_what_to_do(fake_node, site_data, tmp_path, capsys):
    rc = fake_node(["--server", "127.0.0.1:9", "--data", str(site_data), "--insecure"], [TLS_LINE])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"SuperNode: {TLS_LINE}" in err and "ftclient: TLS: the server at 127.0.0.1:9" in err
    assert "the SuperNode exited" not in err
