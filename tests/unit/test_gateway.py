"""server/gateway.py in front of a fake SuperLink on loopback: only the Fleet API's exact paths
go through, bodies above the cap are refused before they are read, headers are filtered, and
Flower's answers come back unchanged. Both servers run in-process (uvicorn in threads, plain
HTTP) except the TLS test, which starts the gateway as ftserver does, as a process."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from fedtune.common.procs import free_port, port_open, spawn, stop
from fedtune.server import gateway

CAP = 100_000


class Upstream:
    """A stand-in SuperLink: answers every path and records what reached it."""

    def __init__(self):
        self.seen: list[dict] = []

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.seen.append(
            {
                "method": request.method,
                "path": request.scope["path"],
                "raw": request.scope["raw_path"],
                "headers": dict(request.headers),
                "size": len(body),
            }
        )
        status = int(request.headers.get("x-test-status", "200"))
        return Response(
            b"flower:" + body[:16],
            status_code=status,
            headers={"x-flwr-answer": "yes", "connection": "close" if status >= 500 else "keep-alive"},
        )

    def app(self):
        return Router([Route("/{rest:path}", self.handle, methods=["GET", "POST", "PUT", "DELETE"])])


def serve(app, port: int, config: uvicorn.Config | None = None, **kw) -> uvicorn.Server:
    config = config or uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on", http="h11", **kw
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    return server


def serve_gateway(upstream: str, port: int) -> uvicorn.Server:
    """The gateway in-process, with the uvicorn settings its process uses."""
    app = gateway.build_app(upstream, False, CAP)
    return serve(app, port, gateway.server_config(app, "127.0.0.1", port))


@pytest.fixture(scope="module")
def pair():
    up = Upstream()
    up_port, gw_port = free_port(), free_port()
    s1 = serve(up.app(), up_port)
    s2 = serve_gateway(f"http://127.0.0.1:{up_port}", gw_port)
    yield up, f"http://127.0.0.1:{gw_port}", gw_port
    s2.should_exit = s1.should_exit = True


def raw(port: int, request: bytes) -> bytes:
    """Send bytes as they are (no client-side path normalisation) and read the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_allowlist_is_flowers_fleet_router():
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    flower = {(r.path, tuple(sorted(r.methods))) for r in router.routes if isinstance(r, APIRoute)}
    assert flower == {(p, ("POST",)) for p in gateway.FLEET_PATHS}, (
        "flwr's Fleet router changed: review gateway.FLEET_PATHS"
    )


@pytest.mark.parametrize("path", gateway.FLEET_PATHS)
def test_fleet_paths_are_forwarded_with_flower_headers(pair, path):
    up, url, _ = pair
    n = len(up.seen)
    headers = {
        "x-flwr-signature": "c2ln",
        "flwr-version": "1.42.0",
        "content-type": "application/protobuf",
        "x-forwarded-for": "6.6.6.6",
        "te": "trailers",
    }
    r = httpx.post(url + path, content=b"\x08\x01payload", headers=headers)
    assert r.status_code == 200 and r.content == b"flower:\x08\x01payload" and r.headers["x-flwr-answer"] == "yes"
    assert len(up.seen) == n + 1
    got = up.seen[-1]
    assert got["path"] == path and got["method"] == "POST" and got["size"] == 9
    assert got["headers"]["x-flwr-signature"] == "c2ln" and got["headers"]["flwr-version"] == "1.42.0"
    assert got["headers"]["content-type"] == "application/protobuf"
    assert got["headers"]["x-forwarded-for"] == "127.0.0.1", "a caller's X-Forwarded-For must not pass"
    assert "te" not in got["headers"]


def test_flower_error_status_and_body_come_back(pair):
    up, url, _ = pair
    for status in (401, 403, 409, 500):
        r = httpx.post(url + "/v1/fleet/get-run", content=b"x", headers={"x-test-status": str(status)})
        assert r.status_code == status and r.content == b"flower:x"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/runtime/acquire-task",
        "/v1/runtime/push-task-output",
        "/health",
        "/docs",
        "/openapi.json",
        "/v1/fleet",
        "/v1/fleet/",
        "/v1/fleet/pull-messages/",
        "/v1/fleet/pull-messagesX",
        "/v1/fleetx/pull-messages",
        "/v1/fleet/push-messages/../../control/list-runs",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2E%2E/control/list-runs",
        "/v1/fleet%2F..%2Fcontrol%2Flist-runs",
        "/v1/fleet/pull%2Dmessages",
        "//v1/fleet/pull-messages",
        "/v1//fleet/pull-messages",
        "/v1/fleet//pull-messages",
        "/V1/FLEET/PULL-MESSAGES",
        "/v1/fleet/pull-messages?x=1",
        "/v1/fleet/pull-messages;x",
        "http://127.0.0.1/v1/control/list-runs",
        "*",
    ],
)
def test_everything_else_is_refused_without_forwarding(pair, path):
    up, _, port = pair
    n = len(up.seen)
    reply = raw(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
    code = status_of(reply) if reply.startswith(b"HTTP/") else None
    assert code in (400, 404), reply[:200]
    assert len(up.seen) == n, f"{path} reached the SuperLink"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "HEAD"])
def test_other_methods_on_fleet_paths_are_refused(pair, method):
    up, url, _ = pair
    n = len(up.seen)
    r = httpx.request(method, url + "/v1/fleet/pull-messages")
    assert r.status_code == 405
    assert len(up.seen) == n


def test_declared_oversized_body_is_refused_before_it_is_sent(pair):
    up, _, port = pair
    n = len(up.seen)
    # Headers only: a 10 GB body is announced and never sent. The gateway answers at once.
    reply = raw(port, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
    assert status_of(reply) == 413
    r = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/push-object", content=b"a" * (CAP + 1))
    assert r.status_code == 413
    assert len(up.seen) == n
    assert httpx.post(f"http://127.0.0.1:{port}/v1/fleet/push-object", content=b"a" * CAP).status_code == 200


def test_chunked_body_is_cut_at_the_cap(pair):
    up, url, _ = pair
    n = len(up.seen)

    def chunks():
        for _ in range(50):
            yield b"b" * 10_000

    r = httpx.post(url + "/v1/fleet/push-object", content=chunks())
    assert r.status_code == 413
    assert all(s["size"] <= CAP for s in up.seen[n:]), "more than the cap reached the SuperLink"

    def small():
        yield b"c" * 1000

    r = httpx.post(url + "/v1/fleet/push-object", content=small())
    assert r.status_code == 200 and up.seen[-1]["size"] == 1000


def test_upstream_down_is_502(tmp_path):
    port = free_port()
    s = serve_gateway(f"http://127.0.0.1:{free_port()}", port)
    try:
        assert httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"x").status_code == 502
    finally:
        s.should_exit = True


def test_gateway_refuses_a_non_loopback_upstream(capsys):
    with pytest.raises(SystemExit):
        gateway.parse_args(["--host", "0.0.0.0", "--port", "1", "--upstream", "http://10.0.0.1:9", "--insecure"])
    assert "loopback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gateway.parse_args(["--host", "0.0.0.0", "--port", "1", "--upstream", "https://127.0.0.1:9"])


def test_tls_process_verifies_the_upstream_with_ca_crt(tmp_path):
    from fedtune.server.certs import create_certificates

    pki = create_certificates(tmp_path / "pki", ["localhost"], days=1)
    other = create_certificates(tmp_path / "other", ["localhost"], days=1)
    up = Upstream()
    up_port = free_port()
    s = serve(up.app(), up_port, ssl_certfile=str(pki["server.crt"]), ssl_keyfile=str(pki["server.key"]))
    procs = []
    try:
        ports = {}
        for name, ca in (("good", pki["ca.crt"]), ("wrong-ca", other["ca.crt"])):
            ports[name] = free_port()
            cmd = [
                sys.executable,
                "-m",
                "fedtune.server.gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports[name]),
                "--upstream",
                f"https://127.0.0.1:{up_port}",
            ]
            cmd += [
                "--ca-cert",
                str(ca),
                "--certfile",
                str(pki["server.crt"]),
                "--keyfile",
                str(pki["server.key"]),
                "--max-body-mb",
                "0.001",
            ]
            procs.append(spawn(cmd, tmp_path / f"{name}.log"))
        for p, port in zip(procs, ports.values()):
            deadline = time.time() + 30
            while not port_open("127.0.0.1", port):
                assert p.poll() is None and time.time() < deadline, (tmp_path / "good.log").read_text()
                time.sleep(0.1)
        ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        r = httpx.post(f"https://localhost:{ports['good']}/v1/fleet/get-run", content=b"hi", verify=ctx)
        assert r.status_code == 200 and r.content == b"flower:hi"
        assert (
            httpx.post(
                f"https://localhost:{ports['good']}/v1/fleet/get-run", content=b"a" * 1001, verify=ctx
            ).status_code
            == 413
        )
        assert (
            httpx.post(f"https://localhost:{ports['good']}/v1/control/list-runs", content=b"", verify=ctx).status_code
            == 404
        )
        # The upstream's certificate is not from the CA it was given: nothing is forwarded.
        n = len(up.seen)
        assert (
            httpx.post(f"https://localhost:{ports['wrong-ca']}/v1/fleet/get-run", content=b"hi", verify=ctx).status_code
            == 502
        )
        assert len(up.seen) == n
        log = (tmp_path / "good.log").read_text()
        assert "refused POST b'/v1/control/list-runs'" in log and "413" in log
    finally:
        for p in procs:
            stop(p, 5)
        s.should_exit = True
    assert all(p.poll() is not None for p in procs)


def test_spawn_capped_rotates(tmp_path):
    from fedtune.common.procs import spawn_capped

    log = tmp_path / "child.log"
    p = spawn_capped(
        [sys.executable, "-c", "import sys\nfor i in range(3000): print('x' * 99)"], log, max_bytes=50_000, backups=2
    )
    p.wait(30)
    deadline = time.time() + 10
    while (not log.exists() or log.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    sizes = [f.stat().st_size for f in (log, tmp_path / "child.log.1", tmp_path / "child.log.2")]
    assert all(0 < s <= 50_000 for s in sizes) and not (tmp_path / "child.log.3").exists()


@pytest.mark.parametrize("insecure", [False, True])
def test_ftserver_puts_the_superlink_on_loopback_and_the_gateway_on_the_public_port(tmp_path, monkeypatch, insecure):
    import os
    import stat

    import tomllib

    from fedtune.client.keys import create_site_keys
    from fedtune.common.config import FedTuneConfig
    from fedtune.server import cli
    from fedtune.server.certs import create_certificates

    create_certificates(tmp_path / "pki", ["coordinator.example"], days=1)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "alpha.pub").write_bytes(create_site_keys(tmp_path / "site")[1].read_bytes())
    net = {
        "certs": None if insecure else str(tmp_path / "pki"),
        "authorized_keys": None if insecure else str(keys),
        "insecure": insecure,
    }
    net = cli.check_network({**net, "host": "0.0.0.0", "port": 8000})
    assert net["max_message_mb"] == gateway.DEFAULT_MAX_BODY_MB == 64
    started = {}

    class Proc:
        def poll(self):
            return None

    def fake_spawn(cmd, log, env=None, cwd=None):
        started[Path(log).name] = cmd
        return Proc()

    monkeypatch.setattr(cli, "spawn_capped", fake_spawn)
    monkeypatch.setattr(
        cli,
        "wait_for_port",
        lambda host, port, proc, timeout: started.setdefault("probed", []).append((host, port)) or True,
    )
    co = cli.Coordinator(FedTuneConfig(), tmp_path / "run", net, resume=False)
    co.start_link()
    co.start_superexec()
    co.start_gateway()

    link, sx, gw = started["superlink.out"], started["superexec.out"], started["gateway.log"]
    arg = lambda cmd, name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert arg(link, "--host") == "127.0.0.1" and arg(link, "--port") != "8000"
    assert co.link_address == f"127.0.0.1:{arg(link, '--port')}"
    assert arg(link, "--isolation") == "process"
    secret = Path(arg(link, "--superexec-auth-secret-file"))
    assert arg(sx, "--superexec-auth-secret-file") == str(secret) and len(secret.read_bytes()) == 32
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(os.stat(co.state).st_mode) == 0o700
    assert arg(link, "--log-file").endswith("superlink.log") and "--log-rotation-backup-count" in link
    assert arg(sx, "--runtime-api-address") == co.link_address
    assert arg(gw, "--host") == "0.0.0.0" and arg(gw, "--port") == "8000" and arg(gw, "--max-body-mb") == "64"
    assert arg(gw, "--upstream") == ("http://" if insecure else "https://") + co.link_address
    assert ("--insecure" in link) == ("--insecure" in sx) == ("--insecure" in gw) == insecure
    if not insecure:
        assert (
            "--enable-supernode-auth" in link
            and arg(gw, "--ca-cert").endswith("ca.crt")
            and arg(sx, "--root-certificates").endswith("ca.crt")
        )
    flwr_home = tomllib.loads((co.state / "flwr" / "config.toml").read_text())
    assert flwr_home["superlink"]["fedtune"]["address"] == co.link_address  # ftserver's own Control API calls
    assert started["probed"] == [("127.0.0.1", int(arg(link, "--port"))), ("127.0.0.1", 8000)]


def test_ftserver_refuses_a_tiny_body_cap_and_a_certificate_without_loopback(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedtune.common.config import ConfigError
    from fedtune.server import cli
    from fedtune.server.certs import create_certificates

    with pytest.raises(ConfigError, match="--max-message-mb 0.5"):
        cli.check_network(
            {
                "certs": None,
                "authorized_keys": None,
                "insecure": True,
                "host": None,
                "port": None,
                "max_message_mb": 0.5,
            }
        )
    pki = create_certificates(tmp_path / "pki", ["coordinator.example"], days=1)
    # A server certificate someone made elsewhere, for the public name only.
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "coordinator.example")])
    import datetime as dt

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2100, 1, 1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("coordinator.example")]), critical=False)
        .sign(key, hashes.SHA384())
    )  # fmt: skip
    pki["server.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keys = tmp_path / "keys"
    keys.mkdir()
    with pytest.raises(ConfigError, match="does not list 127.0.0.1"):
        cli.check_network(
            {
                "certs": str(tmp_path / "pki"),
                "authorized_keys": str(keys),
                "insecure": False,
                "host": None,
                "port": None,
            }
        )


class _Child:
    """A stand-in child process: running (None) until it is given an exit code."""

    def __init__(self, code: int | None = None):
        self.returncode = code

    def poll(self):
        return self.returncode


@pytest.fixture
def play_ftserver(tmp_path, monkeypatch):
    """ftserver's start-up, run and exit played with stand-in children: ``run(submit)`` runs
    ``ftserver --out RUN --insecure`` with ``submit(co)`` in place of ``flwr run`` (it sets
    ``co.run_proc`` and writes what the ServerApp would) -> (exit code, the children stopped)."""
    from fedtune.server import cli

    stopped: list = []
    monkeypatch.setattr(cli, "spawn_capped", lambda cmd, log, env=None, cwd=None: _Child())
    monkeypatch.setattr(cli, "wait_for_port", lambda host, port, proc, timeout: True)
    monkeypatch.setattr(cli, "stop", lambda proc, timeout=15.0: stopped.append(proc))
    monkeypatch.setattr(cli, "sigterm_as_interrupt", lambda: None)

    def run(submit) -> tuple[int, list]:
        monkeypatch.setattr(cli.Coordinator, "submit", submit)
        return cli.main(["--out", str(tmp_path / "run"), "--insecure"]), stopped

    return run


def _ran(status: dict | None, log_line: str = ""):
    def submit(co):
        if log_line:
            with open(co.out / "server.log", "a") as f:
                f.write(log_line + "\n")
        if status is not None:
            (co.out / "run-status.json").write_text(json.dumps(status))
        co.run_proc = _Child(0)

    return submit


def test_ftserver_starts_its_children_says_what_it_runs_and_reports_a_completed_run(play_ftserver, tmp_path, capsys):
    code, stopped = play_ftserver(_ran({"status": "completed", "rounds": 3}, "round 1: done"))
    out, err = capsys.readouterr()
    run = tmp_path / "run"
    assert code == 0
    assert "TLS is OFF" in err and "secure aggregation is OFF" not in err
    said = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[ftserver ")]
    assert said[0].startswith("starting the SuperLink on loopback (NO TLS; no site authentication; ")
    assert said[1] == (
        "sites connect to 127.0.0.1:8000 (NO TLS): the gateway serves only the Fleet API; requests up to 64 MB"
    )
    assert said[2].startswith("run: model ") and said[2].endswith(f"output {run}")
    assert said[3] == (
        f"done: 3 rounds. adapter: {run / 'adapter'}  metrics: {run / 'metrics.json'}  report: {run / 'report.md'}"
    )
    assert "round 1: done" in out.splitlines()  # the ServerApp's progress lines, relayed
    assert json.loads((run / "server.json").read_text())["insecure"] is True
    assert json.loads((run / "config.json").read_text())["secure_aggregation"]["enabled"] is True
    assert len(stopped) == 4  # flwr run, the gateway, the SuperExec, the SuperLink


def test_ftserver_says_why_a_run_failed_and_how_to_resume_it(play_ftserver, tmp_path, capsys):
    code, _ = play_ftserver(_ran({"status": "failed", "reason": "every site dropped out"}))
    err = capsys.readouterr().err
    assert code == 1
    assert "ftserver: run failed: every site dropped out" in err
    assert f"continue with: ftserver --resume {tmp_path / 'run'}" in err


def test_ftserver_without_a_status_points_at_the_serverapp_log(play_ftserver, tmp_path, capsys):
    code, _ = play_ftserver(_ran(None))
    err = capsys.readouterr().err
    assert code == 1
    assert (
        f"run failed: the ServerApp ended without a result; see {tmp_path / 'run' / '.ftserver' / 'serverapp.log'}"
        in err
    )


def test_ftserver_ends_when_a_child_exits_and_on_an_interrupt(play_ftserver, tmp_path, capsys):
    def link_dies(co):
        co.run_proc = _Child()
        co.link.returncode = 3

    code, stopped = play_ftserver(link_dies)
    assert code == 1 and "ftserver: the SuperLink exited (code 3); its log:" in capsys.readouterr().err
    assert len(stopped) == 4

    def interrupted(co):
        raise KeyboardInterrupt

    (tmp_path / "run" / "metrics.json").unlink(missing_ok=True)
    code, _ = play_ftserver(interrupted)
    assert code == 130
    assert f"interrupted; checkpoints so far are in {tmp_path / 'run' / 'checkpoints'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "lengths", [[b"2", b"3"], [b"+2"], [b"2 2"], [b"-1"], [b"0x10"]], ids=["two", "plus", "space", "negative", "hex"]
)
def test_a_conflicting_or_malformed_content_length_is_refused(lengths):
    """Behind uvicorn's parser, the gateway checks the declared length itself before it reads or
    forwards anything: more than one value, or one that is not plain digits, is a 400."""
    from starlette.requests import Request

    from fedtune.server.gateway import _refusal

    headers = [(b"content-length", v) for v in lengths]
    path = "/v1/fleet/push-object"
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    refused = _refusal(Request(scope), CAP)
    assert refused is not None and refused.status_code == 400
    ok = Request({**scope, "headers": [(b"content-length", b"2")]})
    assert _refusal(ok, CAP) is None
