"""ftserver: the coordinator. Starts a Flower SuperLink and runs fedtune's ServerApp on it.

    ftserver init DIR --host NAME [--host NAME ...]      # CA + server certificate (once)
    ftserver --certs DIR --authorized-keys KEYS --out RUN [--config FILE] [--host 0.0.0.0] [--port 8000]
    ftserver --resume RUN                                # after a crash or kill -9

TLS is on unless ``--insecure`` (loudly warned). With TLS, site authentication is on: every
``*.pub`` in ``--authorized-keys`` (an OpenSSH P-384 key from ``ftclient keygen``; the file
name, less ``.pub``, names the site) is registered, and only those sites can join. A key
dropped into that folder while the server runs is registered within seconds.

Four children, all stopped with ftserver (and killed with it, even by ``kill -9``):

- the **SuperLink** on 127.0.0.1 only, on a free port, TLS on (site authentication needs it;
  ``ftserver init``'s certificate covers 127.0.0.1). Flower serves its Fleet, Control and
  Runtime APIs from that one listener, and does not authenticate the Control API, so it is
  never exposed: ftserver itself talks to it there (key registration, ``flwr run``/``stop``);
- the **gateway** (:mod:`fedtune.server.gateway`) on ``--host/--port``, the only thing sites
  reach: it forwards the Fleet API's paths to the SuperLink and refuses everything else, and
  bodies over ``--max-message-mb``;
- a **SuperExec** (``flower-superexec``), which runs the ServerApp: the SuperLink is in
  ``--isolation process`` mode, so the ServerApp is not in its process tree, and its Runtime
  API hands tasks only to a holder of a per-start secret (``.ftserver/superexec.secret``, 0600);
- ``flwr run --stream``, which submits the run and relays its log.

What ftserver leaves in ``--out``: ``adapter/``, ``checkpoints/round-NNNN/`` (verified by a
hash manifest), ``metrics.json``, ``report.md`` + plots, ``server.log`` (the progress lines it
printed), ``config.json`` (the run's resolved config, used by ``--resume``), and ``.ftserver/``
(mode 0700: the SuperLink's state ``superlink.db`` and the logs, each bounded: Flower's own
``superlink.log`` rotates every 6 hours, 8 kept; what each child prints, ``superlink.out``,
``superexec.out`` (with the ServerApp's), ``gateway.log`` and ``serverapp.log`` (``flwr run``),
rotates at 10 MB, 2 kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtune.common import exits
from fedtune.common.checkpoint import atomic_write_bytes, atomic_write_json, write_private_file
from fedtune.common.config import (
    ConfigError,
    FedTuneConfig,
    add_config_flags,
    config_overrides,
    load_config,
    read_config_file,
)
from fedtune.common.procs import (
    end_of,
    flwr_config_string,
    follow,
    free_port,
    rotate,
    sigterm_as_interrupt,
    spawn_capped,
    stop,
    tail,
    tool,
    tool_env,
    wait_for_port,
)

CONN = "fedtune"
STATE_DIR = ".ftserver"
SERVER_JSON = "server.json"
CONFIG_JSON = "config.json"
CERT_FILES = ("ca.crt", "server.crt", "server.key")
LOOPBACK = "127.0.0.1"

INSECURE_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
ftserver: WARNING: --insecure: TLS is OFF. Adapter updates and the global model travel
in clear text, and any machine that reaches this port can join as a site unless
--authorized-keys is given. Use this only on a trusted test network.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""

NO_SECAGG_WARNING = """\
ftserver: WARNING: secure aggregation is OFF (secure_aggregation.enabled: false or
--no-secure-aggregation): this coordinator will see every site's individual update."""


class ServerError(RuntimeError):
    pass


def init(argv: list[str]) -> int:
    from .certs import create_certificates

    p = argparse.ArgumentParser(
        prog="ftserver init",
        description="Create a CA and a server certificate for the coordinator.",
        epilog=exits.epilog(),
        formatter_class=exits.HelpFormatter,
    )
    p.add_argument("dir")
    p.add_argument(
        "--host", action="append", default=[], required=True, help="a DNS name or IP sites will connect to (repeatable)"
    )
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        paths = create_certificates(args.dir, args.host, days=args.days, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"ftserver init: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    print(f"wrote {', '.join(str(x) for x in paths.values())}")
    print(f"certificate valid for: {', '.join(args.host)} (and localhost, for ftserver itself) ({args.days} days)")
    print(f"give {paths['ca.crt']} to every site; keep ca.key and server.key here (mode 0600)")
    return exits.OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftserver",
        description="Run the coordinator: a Flower SuperLink with TLS and site authentication, and fedtune's ServerApp. "
        "'ftserver init DIR --host NAME' makes the certificates.",
        epilog=exits.epilog(),
        formatter_class=exits.HelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML/TOML run config, as for ftsim; site data paths in it are ignored (default: the built-in defaults)",
    )
    p.add_argument("--out", help="output directory for this run (required unless --resume)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last verified checkpoint")
    p.add_argument("--certs", metavar="DIR", help="folder with ca.crt, server.crt, server.key (from 'ftserver init')")
    p.add_argument(
        "--authorized-keys",
        metavar="DIR",
        help="folder of SITE.pub files (from 'ftclient keygen'); only these sites may join",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS (test networks only)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="port sites connect to (default 8000)")
    p.add_argument(
        "--max-message-mb",
        type=float,
        default=None,
        help="largest request a site may send, in MB (default 64; Flower sends arrays in 5 MiB chunks, so this fits any model)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. train.lr=1e-4 (repeatable)",
    )
    add_config_flags(p, "ftserver")  # --rounds, --peft, --no-secure-aggregation, ...: declared in common/config.py
    return p


def resolve(args: argparse.Namespace) -> tuple[FedTuneConfig, Path, dict]:
    """-> (config, output dir, network settings). On --resume both come from the run's folder."""
    overrides = config_overrides(args, "ftserver")
    net = {
        "certs": args.certs,
        "authorized_keys": args.authorized_keys,
        "insecure": args.insecure,
        "host": args.host,
        "port": args.port,
    }
    net["max_message_mb"] = args.max_message_mb
    if args.resume:
        return resolve_resumed(args, overrides, net)
    if not args.out:
        raise ConfigError("--out DIR is required: where the run's adapter, checkpoints and metrics go")
    out = Path(args.out).resolve()
    if (out / "metrics.json").exists():
        raise ConfigError(
            f"--out {args.out} already holds a run; continue it with --resume {args.out}, or choose another folder"
        )
    base, source = (read_config_file(args.config), args.config) if args.config else ({}, "the built-in defaults")
    fed = base.get("federation") if isinstance(base.get("federation"), dict) else None
    if fed and isinstance(fed.get("sites"), list):
        # Sites keep their data; a list of sites here only says how many to wait for.
        fed = dict(fed)
        n = len(fed.pop("sites"))
        fed.setdefault("expected_sites", n)
        base = {**base, "federation": fed}
    return load_config(None, overrides, base=base, source=source).with_secure_default(True), out, net


def resolve_resumed(args: argparse.Namespace, overrides: dict, net: dict) -> tuple[FedTuneConfig, Path, dict]:
    """resolve for --resume DIR: the config and network settings saved in DIR, flags given now
    winning over the saved ones."""
    if args.config or args.out:
        raise ConfigError(
            "--resume DIR takes the run's saved config and writes to DIR; don't combine it with --config or --out"
        )
    out = Path(args.resume).resolve()
    saved_cfg, saved_net = out / CONFIG_JSON, out / SERVER_JSON
    try:
        base = json.loads(saved_cfg.read_text())
        old_net = json.loads(saved_net.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"--resume {args.resume}: nothing to resume (no readable {CONFIG_JSON} and {SERVER_JSON}: not an ftserver run folder)"
        ) from None
    if not (out / "metrics.json").is_file():
        raise ConfigError(
            f"--resume {args.resume}: the run never finished its first evaluation (no metrics.json); start it again instead"
        )
    for k, v in old_net.items():  # flags given now win over the saved ones
        if net.get(k) in (None, False):
            net[k] = v
    return load_config(None, overrides, base=base, source=str(saved_cfg)).with_secure_default(True), out, net


def check_network(net: dict) -> dict:
    net["host"] = net["host"] or "127.0.0.1"
    if net["port"] is None:
        net["port"] = 8000
    if not 1 <= int(net["port"]) <= 65535:
        raise ConfigError(f"--port {net['port']}: expected 1..65535")
    from .gateway import DEFAULT_MAX_BODY_MB

    if net.get("max_message_mb") is None:
        net["max_message_mb"] = DEFAULT_MAX_BODY_MB
    if not 1 <= float(net["max_message_mb"]) <= 1 << 20:
        raise ConfigError(
            f"--max-message-mb {net['max_message_mb']}: expected at least 1 (Flower's requests reach 5 MiB)"
        )
    if net["insecure"]:
        net["certs"] = None
    else:
        if not net["certs"]:
            raise ConfigError(
                "TLS is on: pass --certs DIR (make one with 'ftserver init DIR --host NAME'), or --insecure for a test network"
            )
        d = Path(net["certs"]).resolve()
        missing = [f for f in CERT_FILES if not (d / f).is_file()]
        if missing:
            raise ConfigError(
                f"--certs {d}: missing {', '.join(missing)} (make them with 'ftserver init {d} --host NAME')"
            )
        net["certs"] = str(d)
        check_server_cert_covers_loopback(d / "server.crt")
        if not net["authorized_keys"]:
            raise ConfigError(
                "site authentication is on with TLS: pass --authorized-keys DIR, a folder of SITE.pub files "
                "(each site makes its key with 'ftclient keygen --out DIR' and sends you site_key.pub)"
            )
    if net["authorized_keys"]:
        d = Path(net["authorized_keys"]).resolve()
        if not d.is_dir():
            raise ConfigError(f"--authorized-keys {d}: not a folder (expected one SITE.pub file per site)")
        net["authorized_keys"] = str(d)
        for f in sorted(d.glob("*.pub")):
            check_public_key(f)
    return net


def check_server_cert_covers_loopback(path: Path) -> None:
    """The SuperLink listens on 127.0.0.1 with server.crt, and ftserver and the gateway verify it there."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress
        )
    except (OSError, ValueError, x509.ExtensionNotFound) as e:
        raise ConfigError(
            f"{path}: not a readable server certificate with subject alternative names ({type(e).__name__})"
        ) from None
    if ipaddress.ip_address(LOOPBACK) not in ips:
        raise ConfigError(
            f"{path}: does not list {LOOPBACK}, where ftserver talks to its SuperLink; make the certificates with 'ftserver init'"
        )


def check_public_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: not an OpenSSH public key ({type(e).__name__}); expected site_key.pub from 'ftclient keygen'"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ConfigError(f"{path}: expected an ECDSA P-384 key (ftclient keygen makes one), got {type(key).__name__}")


def probe_host(net: dict) -> str:
    """Where ftserver checks that the gateway listens."""
    return LOOPBACK if net["host"] in ("0.0.0.0", "::", "localhost") else net["host"]


def write_flwr_home(home: Path, net: dict, address: str) -> None:
    """Flower's CLI config for ``flwr run``/``stop``: the SuperLink's loopback address."""
    lines = ["[superlink]", f'default = "{CONN}"', "", f"[superlink.{CONN}]", f'address = "{address}"']
    if net["insecure"]:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(net["certs"]) / "ca.crt"}"')
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(home / "config.toml", ("\n".join(lines) + "\n").encode())


class Coordinator:
    """The SuperLink, SuperExec and gateway children, key registration, and the run submitted."""

    def __init__(self, cfg: FedTuneConfig, out: Path, net: dict, resume: bool):
        self.cfg, self.out, self.net, self.resume = cfg, out, net, resume
        self.state = out / STATE_DIR
        self.env = tool_env({"FLWR_HOME": str(self.state / "flwr")})
        self.link: subprocess.Popen | None = None
        self.superexec: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.run_proc: subprocess.Popen | None = None
        self.link_address = ""  # 127.0.0.1:PORT, chosen at start
        self._run_id: str | None = None
        self.registered: set[str] = set()
        self._control = None
        self.folder_lock = None  # hold_folder's open file: the lock lives as long as it does
        self.stopping = threading.Event()

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.state
        )

    def start_link(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)  # the SuperLink's database (messages, node keys) and the SuperExec secret
        port = free_port(LOOPBACK)
        self.link_address = f"{LOOPBACK}:{port}"
        write_flwr_home(self.state / "flwr", self.net, self.link_address)
        write_private_file(self.state / "superexec.secret", os.urandom(32))
        cmd = [
            tool("flower-superlink"),
            "--host", LOOPBACK,
            "--port", str(port),
            "--disable-runtime-dependency-installation",
            # The ServerApp runs under our own SuperExec (start_superexec), which must present
            # the secret to take a task from the Runtime API.
            "--isolation", "process",
            "--superexec-auth-secret-file", str(self.state / "superexec.secret"),
            # Registrations and node ids survive a restart, so sites reconnect to a resumed run.
            "--database", str(self.state / "superlink.db"),
            "--log-file", str(self.state / "superlink.log"),
            "--log-rotation-interval-hours", "6",
            "--log-rotation-backup-count", "8",
        ]  # fmt: skip
        if self.net["insecure"]:
            cmd.append("--insecure")
        else:
            c = Path(self.net["certs"])
            cmd += [
                "--ssl-ca-certfile",
                str(c / "ca.crt"),
                "--ssl-certfile",
                str(c / "server.crt"),
                "--ssl-keyfile",
                str(c / "server.key"),
            ]
        if self.net["authorized_keys"]:
            cmd.append("--enable-supernode-auth")
        log = self.state / "superlink.out"
        self.link = spawn_capped(cmd, log, env=self.env, cwd=self.state)
        if not wait_for_port(LOOPBACK, port, self.link, 60):
            stop(self.link)
            raise ServerError(f"the SuperLink did not start on {self.link_address}. Its output ({log}):\n{tail(log)}")

    def start_superexec(self) -> None:
        cmd = [
            tool("flower-superexec"),
            "--runtime-api-address", self.link_address,
            "--superexec-auth-secret-file", str(self.state / "superexec.secret"),
            "--parent-pid", str(os.getpid()),
            *(["--insecure"] if self.net["insecure"] else ["--root-certificates", str(Path(self.net["certs"]) / "ca.crt")]),
        ]  # fmt: skip
        # Its ServerApp processes write here too (they inherit its output).
        self.superexec = spawn_capped(cmd, self.state / "superexec.out", env=self.env, cwd=self.state)

    def start_gateway(self) -> None:
        net = self.net
        scheme = "http" if net["insecure"] else "https"
        cmd = [
            sys.executable, "-m", "fedtune.server.gateway",
            "--host", net["host"],
            "--port", str(net["port"]),
            "--upstream", f"{scheme}://{self.link_address}",
            "--max-body-mb", str(net["max_message_mb"]),
        ]  # fmt: skip
        if net["insecure"]:
            cmd.append("--insecure")
        else:
            c = Path(net["certs"])
            cmd += [
                "--ca-cert",
                str(c / "ca.crt"),
                "--certfile",
                str(c / "server.crt"),
                "--keyfile",
                str(c / "server.key"),
            ]
        log = self.state / "gateway.log"
        self.gateway = spawn_capped(cmd, log, env=self.env, cwd=self.state)
        if not wait_for_port(probe_host(net), int(net["port"]), self.gateway, 60):
            stop(self.gateway)
            raise ServerError(
                f"the gateway did not start on {net['host']}:{net['port']} (port in use?). Its log ({log}):\n{tail(log)}"
            )

    def check_children(self) -> None:
        for name, proc, log in (
            ("SuperLink", self.link, "superlink.out"),
            ("SuperExec", self.superexec, "superexec.out"),
            ("gateway", self.gateway, "gateway.log"),
        ):
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"the {name} exited (code {proc.returncode}); its log:\n{tail(self.state / log)}")

    def control(self):
        """A Control API client for our own SuperLink (Flower's CLI plumbing, in-process: one
        ``flwr`` process per key would cost seconds each)."""
        if self._control is None:
            import contextlib
            import io
            import os

            from flwr.cli.flower_config import read_superlink_connection
            from flwr.cli.utils import init_http_client_from_connection

            os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using SuperLink: ..."
                self._control = init_http_client_from_connection(read_superlink_connection(CONN))
        return self._control

    def register_keys(self, say) -> None:
        """Register every new SITE.pub in the authorized-keys folder (each once per process;
        a key the SuperLink's database already holds from before a restart is fine)."""
        import httpx
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        d = self.net["authorized_keys"]
        if not d:
            return
        for f in sorted(Path(d).glob("*.pub")):
            if f.name in self.registered:
                continue
            self.registered.add(f.name)
            try:
                check_public_key(f)
            except ConfigError as e:
                say(f"not registering {f.name}: {e}")
                continue
            key = public_key_to_bytes(serialization.load_ssh_public_key(f.read_bytes()))
            try:
                self.control().RegisterNode(RegisterNodeRequest(public_key=key, name=f.stem[:60]))
                say(f"site key registered: {f.stem} ({f.name})")
            except httpx.HTTPStatusError as e:
                text = e.response.text
                if "already" in text.lower() or "in use" in text.lower():
                    say(f"site key registered: {f.stem} ({f.name}, from before)")
                else:
                    say(f"could not register {f.name}: HTTP {e.response.status_code} {text[:200]}")

    def watch_keys(self, say) -> None:
        while not self.stopping.wait(3.0):
            try:
                self.register_keys(say)
            except Exception as e:  # noqa: BLE001 - keep watching
                say(f"key registration: {e}")

    def start(self, say) -> None:
        """The SuperLink, the SuperExec, the site keys (registered, then watched) and the gateway,
        with what ftserver says of each and of the run."""
        net, cfg, fed = self.net, self.cfg, self.cfg.federation
        tls = "TLS" if not net["insecure"] else "NO TLS"
        auth = f"site keys from {net['authorized_keys']}" if net["authorized_keys"] else "no site authentication"
        say(
            f"starting the SuperLink on loopback ({tls}; {auth}; runtime dependency installation off; ServerApp under a SuperExec with a secret)"
        )
        self.start_link()
        self.start_superexec()
        self.register_keys(say)
        threading.Thread(target=self.watch_keys, args=(say,), daemon=True).start()
        self.start_gateway()
        say(
            f"sites connect to {net['host']}:{net['port']} ({tls}): the gateway serves only the Fleet API; requests up to {net['max_message_mb']:g} MB"
        )
        say(
            f"{'resuming' if self.resume else 'run'}: model {cfg.model.name}; {cfg.peft.describe()}; {fed.strategy}; "
            f"secure aggregation {'on (SecAgg+)' if cfg.secure_aggregation.enabled else 'OFF'}; {fed.rounds} rounds; "
            f"waiting up to {fed.join_timeout_s:.0f} s for {fed.expected_sites or fed.min_sites} site(s) (min {fed.min_sites}); output {self.out}"
        )

    def submit_and_wait(self) -> None:
        """Submit the run and wait for ``flwr run`` to end; ServerError as soon as another child exits."""
        (self.out / "run-status.json").unlink(missing_ok=True)  # only this run's ServerApp may write it
        self.submit()
        while self.run_proc.poll() is None:
            self.check_children()
            self.run_id()
            time.sleep(0.5)

    def submit(self) -> None:
        from .deploy import write_app_dir

        app_dir = write_app_dir(self.state / "app")
        run_config = flwr_config_string(
            {"config-path": str(self.out / CONFIG_JSON), "out-dir": str(self.out), "resume": self.resume}
        )
        rotate(self.state / "serverapp.log", 2)  # this start's log alone in serverapp.log: run_id reads it
        self.run_proc = spawn_capped(
            [tool("flwr"), "run", str(app_dir), CONN, "--run-config", run_config, "--stream"],
            self.state / "serverapp.log",
            env=self.env,
            cwd=self.state,
        )

    def run_id(self) -> str | None:
        """The submitted run's id, from the head of ``flwr run``'s output (kept once seen: the log rotates)."""
        if self._run_id is None:
            m = re.search(r"started run (\d+)", tail(self.state / "serverapp.log", 400))
            self._run_id = m.group(1) if m else None
        return self._run_id

    def shutdown(self) -> None:
        self.stopping.set()
        if self.run_proc is not None and self.run_proc.poll() is None:
            rid = self.run_id()
            if rid and self.link is not None and self.link.poll() is None:
                try:
                    self.flwr("stop", rid, CONN, timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        stop(self.run_proc, 10)
        stop(self.gateway, 10)
        stop(self.superexec, 15)
        stop(self.link, 15)


def hold_folder(out: Path):
    """One ftserver per run folder: an exclusive lock held for this process's life (released by
    the kernel even on kill -9, so --resume after a crash is never locked out)."""
    import fcntl
    import os

    path = out / STATE_DIR / "ftserver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - kept open (and locked) until the process exits
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"{out}: another ftserver (pid {pid}) is running this run") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _say(msg: str) -> None:
    """A progress line of ftserver's own, on stdout."""
    print(f"[ftserver {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(args: argparse.Namespace):
    """The run's config, output folder and checked network settings, with a warning for each
    protection that is off, and the run folder locked -> (config, out, net, the lock's file).
    Raises ConfigError."""
    cfg, out, net = resolve(args)
    net = check_network(net)
    if net["insecure"]:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    if not cfg.secure_aggregation.enabled:
        print(NO_SECAGG_WARNING, file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out, net, hold_folder(out)


def finished_run(out: Path, rounds: int) -> str | None:
    """--resume OUT of a finished run that ``rounds`` does not extend: what to say (else None)."""
    from .record import FILE, RecordError, finished_note, read_record

    try:
        return finished_note(read_record(out / FILE), out, rounds)
    except RecordError:  # the ServerApp's own resume says what is wrong with it
        return None


def save_settings(out: Path, cfg: FedTuneConfig, net: dict) -> None:
    """config.json (what the ServerApp runs and --resume reads back) and server.json (the network
    settings --resume starts from)."""
    atomic_write_bytes(out / CONFIG_JSON, cfg.to_json().encode())
    atomic_write_json(out / SERVER_JSON, net)


def run_children(co: Coordinator) -> int | None:
    """Start the children, relay server.log, submit the run and wait for it, then stop every child
    whatever happened -> 130 on an interrupt, 1 if a child failed (``fedtune.common.exits``), None once the run ended (how,
    run-status.json says: :func:`outcome`)."""
    follower_stop = threading.Event()
    log = co.out / "server.log"
    follower = threading.Thread(target=follow, args=(log, follower_stop, print, end_of(log)), daemon=True)
    try:
        co.start(_say)
        follower.start()
        co.submit_and_wait()
    except KeyboardInterrupt:
        _say(
            f"interrupted; checkpoints so far are in {co.out / 'checkpoints'}; continue with: ftserver --resume {co.out}"
        )
        return exits.INTERRUPTED
    except ServerError as e:
        print(f"ftserver: {e}", file=sys.stderr)
        return exits.FAILED
    finally:
        co.shutdown()
        follower_stop.set()
        if follower.is_alive():
            follower.join(5)
    return None


def outcome(co: Coordinator) -> int:
    """How the run ended, from the ServerApp's run-status.json -> 0 when it completed; else 1,
    with why it failed and how to resume it."""
    out = co.out
    try:
        status = json.loads((out / "run-status.json").read_text())
    except (OSError, ValueError):
        status = {"status": "unknown"}
    if status.get("status") == "completed":
        _say(
            f"done: {status.get('rounds')} rounds. adapter: {out / 'adapter'}  metrics: {out / 'metrics.json'}  report: {out / 'report.md'}"
        )
        return exits.OK
    from .deploy import missing_status_reason

    logs = "\n".join(tail(co.state / name, 400) for name in ("serverapp.log", "superexec.out"))
    reason = (
        status.get("reason")
        or missing_status_reason(out, logs)  # a full disk, or the status printed when the file could not be written
        or f"the ServerApp ended without a result; see {co.state / 'serverapp.log'}:\n{tail(co.state / 'serverapp.log')}"
    )
    print(f"ftserver: run failed: {reason}", file=sys.stderr)
    print(
        f"ftserver: checkpoints so far are in {out / 'checkpoints'}; continue with: ftserver --resume {out}",
        file=sys.stderr,
    )
    return exits.FAILED


def serve(args: argparse.Namespace) -> int:
    try:
        cfg, out, net, owner = prepare(args)
    except ConfigError as e:
        print(f"ftserver: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    if args.resume and (note := finished_run(out, cfg.federation.rounds)) is not None:
        print(f"ftserver: {note}")  # nothing started: no round run again, no score taken again
        owner.close()
        return exits.OK
    save_settings(out, cfg, net)
    co = Coordinator(cfg, out, net, resume=bool(args.resume))
    co.folder_lock = owner
    sigterm_as_interrupt()
    code = run_children(co)
    return outcome(co) if code is None else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "init":
        return init(argv[1:])
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
