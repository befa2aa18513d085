"""The network sees only the Fleet API: an attacker on the coordinator's public port, holding a
registered site's private key and ca.crt, tries the Control API, the Runtime API, the Fleet
API's own node (un)registration, an oversized body and spelled-around paths, while registered
sites complete their rounds. Every attempt is refused and the federation goes on; then the
coordinator is killed with SIGKILL mid-run and ``ftserver --resume`` finishes it.

ftserver and ftclient run as real processes (TLS, site keys, the tiny model), as in
test_deploy.py. The attacker posts Flower's own protobuf requests with httpx, as Flower's
clients do (flwr/supercore/protobuf/client.py), with the signed identity headers a SuperNode
sends (flwr/supernode/node_auth_http_interceptor.py) where the key is any use.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
from base64 import b64encode
from pathlib import Path

import flwr
import httpx
import psutil
import pytest
import tomllib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto import control_pb2, fab_pb2, fleet_pb2, message_pb2, runtime_pb2  # pylint: disable=E0611
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from .test_deploy import DATA, _rounds, federation  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

VERSION = {"flwr-package-name": "flwr", "flwr-package-version": flwr.__version__, "flwr-component-name": "SuperExec"}


class Attacker:
    """Holds a registered site's private key and ca.crt; talks to ``base`` (host:port) over TLS."""

    def __init__(self, base: str, ca: Path, site_key: Path):
        self.base = base
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.key = serialization.load_ssh_private_key(site_key.read_bytes(), None)
        self.client = httpx.Client(verify=self.ctx, timeout=60, trust_env=False)

    def signed(self, key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
        ts = now().isoformat()
        return {
            "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),
            "flwr-timestamp": ts,
            "flwr-signature": b64encode(sign_message(key, ts.encode("ascii"))).decode(),
        }

    def post(
        self, path: str, msg, *, key: ec.EllipticCurvePrivateKey | None = None, target: str | None = None
    ) -> httpx.Response:
        headers = {
            "content-type": "application/protobuf",
            "accept": "application/protobuf",
            **VERSION,
            **self.signed(key or self.key),
        }
        req = self.client.build_request(
            "POST", f"https://{self.base}{path}", content=msg.SerializeToString(), headers=headers
        )
        if target is not None:  # the request line exactly as given: httpx would normalise ../ and //
            req.extensions["target"] = target.encode()
        return self.client.send(req)


def refused_by_gateway(r: httpx.Response) -> bool:
    return r.status_code == 404 and r.text == "Not Found"


def flower_error_code(r: httpx.Response) -> int | None:
    from flwr.supercore.error import FlowerError

    err = FlowerError.from_json(r.text)
    return err.code if err else None


def node_id_of(db: Path, key) -> int:
    with sqlite3.connect(db) as c:
        (nid,) = c.execute(
            "SELECT node_id FROM node WHERE public_key = ?", (public_key_to_bytes(key.public_key()),)
        ).fetchone()
    return nid + (1 << 64) if nid < 0 else nid


def oversized_declared(host: str, port: int, ca: Path) -> bytes:
    """Headers announcing a 10 GB push-object, and no body: refused at once, nothing read."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=30) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(
            b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nContent-Type: application/protobuf\r\nContent-Length: 10000000000\r\n\r\n"
        )
        return s.recv(4096)


def attack(a: Attacker, db: Path, port: int, ca: Path) -> dict[str, tuple[bool, str]]:
    """-> {attempt: (refused, what came back)}."""
    sybil = ec.generate_private_key(ec.SECP384R1())
    alpha_id = node_id_of(db, a.key)
    with sqlite3.connect(db) as c:
        (run_id,) = c.execute("SELECT run_id FROM run").fetchone()
    run_id = run_id + (1 << 64) if run_id < 0 else run_id
    out: dict[str, tuple[bool, str]] = {}

    def gw(name: str, r: httpx.Response) -> None:
        out[name] = (refused_by_gateway(r), f"{r.status_code} {r.text[:120]!r}")

    # Control API: a Sybil node, a run whose ServerApp would run on the coordinator, and the rest.
    fab = fab_pb2.Fab(hash_str="0" * 64, content=b"PK\x05\x06" + b"\0" * 18)
    gw("control start-run", a.post("/v1/control/start-run", control_pb2.StartRunRequest(fab=fab)))
    gw(
        "control register-node",
        a.post(
            "/v1/control/register-node",
            control_pb2.RegisterNodeRequest(public_key=public_key_to_bytes(sybil.public_key()), name="sybil"),
        ),
    )
    gw(
        "control unregister-node",
        a.post("/v1/control/unregister-node", control_pb2.UnregisterNodeRequest(node_id=alpha_id)),
    )
    gw("control stop-run", a.post("/v1/control/stop-run", control_pb2.StopRunRequest(run_id=run_id)))
    gw("control list-runs", a.post("/v1/control/list-runs", control_pb2.ListRunsRequest()))
    gw("control list-nodes", a.post("/v1/control/list-nodes", control_pb2.ListNodesRequest()))
    # Runtime API: the ServerApp's task queue and its inputs and outputs.
    gw("runtime acquire-task", a.post("/v1/runtime/acquire-task", runtime_pb2.AcquireTaskRequest()))
    gw("runtime pull-task-input", a.post("/v1/runtime/pull-task-input", runtime_pb2.PullTaskInputRequest()))
    gw("runtime push-task-output", a.post("/v1/runtime/push-task-output", runtime_pb2.PushTaskOutputRequest()))
    gw("runtime get-nodes", a.post("/v1/runtime/get-nodes", runtime_pb2.GetNodesRequest()))
    gw("runtime pull-object", a.post("/v1/runtime/pull-object", message_pb2.PullObjectRequest()))
    # Spelled-around paths to a forbidden endpoint.
    for target in (
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2E%2E/control/list-runs",
        "/v1/fleet%2F..%2Fcontrol%2Flist-runs",
        "/v1/fleet/..%2Fcontrol/list-runs",
        "//v1/control/list-runs",
        "/v1//control/list-runs",
        "/v1/control/list-runs/",
        "/v1/fleet/get-run/../../control/list-runs",
    ):
        gw(f"path {target}", a.post("/v1/control/list-runs", control_pb2.ListRunsRequest(), target=target))
    # The Fleet API's own node enrolment: forwarded, and refused by Flower (site authentication on).
    r = a.post(
        "/v1/fleet/register-node",
        fleet_pb2.RegisterNodeFleetRequest(public_key=public_key_to_bytes(sybil.public_key())),
        key=sybil,
    )
    out["fleet register-node"] = (
        r.status_code == 412 and flower_error_code(r) == 2001,
        f"{r.status_code} {r.text[:160]!r}",
    )
    r = a.post("/v1/fleet/unregister-node", fleet_pb2.UnregisterNodeFleetRequest(node_id=alpha_id))
    out["fleet unregister-node"] = (
        r.status_code == 412 and flower_error_code(r) == 2002,
        f"{r.status_code} {r.text[:160]!r}",
    )
    # Bodies over the cap (64 MB by default): announced, and streamed without a length.
    reply = oversized_declared("localhost", port, ca)
    out["oversized declared"] = (reply.startswith(b"HTTP/1.1 413"), repr(reply[:80]))

    def stream():
        block = b"\0" * (1 << 20)
        for _ in range(70):
            yield block

    headers = {"content-type": "application/protobuf", **VERSION, **a.signed(a.key)}
    try:
        r = a.client.post(f"https://{a.base}/v1/fleet/push-object", content=stream(), headers=headers)
        out["oversized chunked"] = (r.status_code == 413, f"{r.status_code} {r.text[:80]!r}")
    except httpx.TransportError as e:  # cut off mid-upload is a refusal too
        out["oversized chunked"] = (True, f"connection closed: {type(e).__name__}")
    return out


def test_attacker_on_the_public_port_gets_only_the_fleet_api_and_a_killed_coordinator_resumes(federation, tmp_path):  # noqa: F811
    """One federation for two real-process checks (each start of ftserver and two ftclients is
    a minute of this machine's CPU): the attack while the rounds go on, then the coordinator
    killed with SIGKILL mid-run and ``ftserver --resume``, ending at the same round count."""
    fed = federation(rounds=4)
    server, keys = fed.two_sites_one_round_in()

    state = fed.out / ".ftserver"
    db = state / "superlink.db"
    internal = tomllib.loads((state / "flwr" / "config.toml").read_text())["superlink"]["fedtune"]["address"]
    assert internal.startswith("127.0.0.1:") and internal != f"127.0.0.1:{fed.port}"
    # The attacker holds alpha's private key and ca.crt, and reaches the public port.
    a = Attacker(f"localhost:{fed.port}", fed.pki / "ca.crt", keys["alpha"])
    results = attack(a, db, fed.port, fed.pki / "ca.crt")
    failed = {k: v for k, (ok, v) in results.items() if not ok}
    assert not failed, "not refused:\n" + "\n".join(f"  {k}: {v}" for k, v in failed.items())

    # The ServerApp's Runtime API also wants the SuperExec secret, even on loopback.
    r = httpx.post(f"https://{internal}/v1/runtime/acquire-task", content=runtime_pb2.AcquireTaskRequest().SerializeToString(),
                   headers={"content-type": "application/protobuf", **VERSION}, verify=a.ctx, trust_env=False)  # fmt: skip
    assert r.status_code == 401, f"{r.status_code} {r.text[:200]}"

    # The federation goes on as if nothing happened: the next round completes with both sites.
    fed.wait_for("server.out", "round 2/4 done", 180)
    # No Sybil node, no second run, alpha still registered.
    with sqlite3.connect(db) as c:
        nodes = {bytes(k): status for k, status in c.execute("SELECT public_key, status FROM node")}
        assert c.execute("SELECT count(*) FROM run").fetchone()[0] == 1
    site_keys = {
        public_key_to_bytes(serialization.load_ssh_private_key(k.read_bytes(), None).public_key())
        for k in keys.values()
    }
    assert set(nodes) == site_keys and "unregistered" not in nodes.values(), nodes.values()
    # Refusals are logged by the gateway.
    assert "refused POST b'/v1/control/start-run'" in (state / "gateway.log").read_text()

    # The coordinator killed with SIGKILL mid-run (its SuperLink goes with it), then resumed.
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    first = _rounds(fed.out)
    assert first[-1]["round"] in (2, 3) and all(r["accepted"] == 2 for r in first[1:])
    resumed = fed.server("--resume", str(fed.out), log="resumed.out")
    assert fed.finish(resumed, 240, "resumed.out") == 0, fed.text("resumed.out")[-4000:]
    said = fed.text("resumed.out")
    assert "resuming after round" in said and "site key registered" in said
    rounds = _rounds(fed.out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4] and all(r["accepted"] == 2 for r in rounds[1:])
    assert rounds[1] == first[1]  # history before the crash is kept as it was
    st = json.loads((fed.out / "checkpoints" / "round-0004" / "server_state.json").read_text())
    assert st["round"] == 4 and st["rng"]["bit_generator"] == "PCG64"

    # Nothing of ftserver's is left running, and neither port still listens.
    leftovers = [
        p.info
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(fed.out) in part for part in (p.info["cmdline"] or []))
    ]
    assert not leftovers, leftovers
    for port in (fed.port, int(internal.rsplit(":", 1)[1])):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
