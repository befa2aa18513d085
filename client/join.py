"""``ftclient --server HOST:PORT --data FILE``: join a federation as a site.

Two processes per site: a Flower SuperNode (child; talks to the coordinator over TLS, signs
in with the site key) and this one, the resident executor (:mod:`fedtune.client.worker`),
which serves every task the SuperNode receives with the model kept loaded. The SuperNode's
Runtime API listens on 127.0.0.1 only, on a free port, and hands tasks only to a holder of a
per-run secret (a 0600 file in the work folder), so no other local process can take them.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.common import exits
from fedtune.common.checkpoint import write_private_file
from fedtune.common.procs import (
    flwr_config_string,
    follow,
    free_port,
    sigterm_as_interrupt,
    spawn,
    stop,
    tail,
    tool_env,
)
from fedtune.common.threads import add_device_flags, set_threads

EXIT_REFUSED = exits.REFUSED
REFUSED_MARKERS = ("[code: 2004]", "Failed to activate SuperNode")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

INSECURE_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
ftclient: WARNING: --insecure: TLS is OFF. This site's adapter updates travel in clear
text and the server is not authenticated. Use this only on a trusted test network.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


class JoinError(ValueError):
    pass


def join_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftclient",
        description="Join a federation as a site (subcommands: 'ftclient check', 'ftclient keygen'). "
        "Data paths and the device stay at this site; only adapter updates and metrics are sent.",
        epilog=exits.epilog(),
        formatter_class=exits.HelpFormatter,
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument(
        "--data", required=True, metavar="FILE", help="this site's training data (JSONL, JSON, CSV or Parquet)"
    )
    p.add_argument("--eval-data", metavar="FILE", help="held-out evaluation data (default: a split of --data)")
    p.add_argument("--name", help="this site's name in the coordinator's reports (default: the host name)")
    p.add_argument("--ca-cert", metavar="FILE", help="the coordinator's ca.crt (required with TLS)")
    p.add_argument("--key", metavar="FILE", help="this site's private key from 'ftclient keygen' (required with TLS)")
    p.add_argument("--insecure", action="store_true", help="no TLS (test networks only)")
    add_device_flags(p, "trains")
    p.add_argument(
        "--rank",
        type=int,
        help="this site's LoRA rank, below the run's peft.r for a site with less GPU memory (mixed ranks, HetLoRA; default: the run's)",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="folder for the SuperNode's log, its runtime secret and, when a run personalizes, this site's private "
        "part (site-state/; give the same folder again to keep it across restarts; default: a new private temp folder)",
    )
    p.add_argument(
        "--peer-keys",
        metavar="DIR",
        help="the registered sites' site_key.pub files, as you got them from the sites themselves: under secure aggregation this "
        "site then shares its secrets only with sites whose keys are among them (without it, it trusts the keys the coordinator "
        "publishes, and a malicious coordinator could enrol keys of its own)",
    )
    add_policy_flags(p)
    return p


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    """This site's policy (fedtune.client.policy): what it refuses whatever the coordinator asks."""
    pol = p.add_argument_group(
        "site policy (checked before every round trains; a refusal says why here and to the coordinator)"
    )
    pol.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="also take part in rounds without secure aggregation (default: refuse them)",
    )
    pol.add_argument(
        "--min-noise-multiplier",
        type=float,
        metavar="X",
        help="require differential privacy: refuse a round whose noise multiplier (as this site computes it from the run's "
        "privacy settings and population) is below X, a round with DP off, and a plaintext round",
    )
    pol.add_argument(
        "--model",
        metavar="NAME",
        help="the only model this site takes: 'default', a local folder or .gguf, or a hub id (default: the run's, with its sha256 logged)",
    )
    pol.add_argument(
        "--model-sha256",
        metavar="HEX",
        help="the only weights this site takes: sha256 of the model's weights file (of several: of their sha256sum listing), as ftclient logs it",
    )
    pol.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where this site provisions models (default: $FEDTUNE_CACHE or ~/.cache/fedtune); the coordinator's model.cache_dir is ignored",
    )
    pol.add_argument(
        "--model-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder a run's local model may be in, besides the cache and --work-dir (repeatable)",
    )


def site_policy(args: argparse.Namespace, work: Path):
    """This site's policy, from its own flags only (never from a message)."""
    from .policy import SitePolicy

    try:
        return SitePolicy.strict(
            allow_plaintext=bool(getattr(args, "allow_plaintext", False)),
            min_noise_multiplier=getattr(args, "min_noise_multiplier", None),
            model=getattr(args, "model", None),
            model_sha256=getattr(args, "model_sha256", None),
            cache_dir=getattr(args, "cache_dir", None),
            work_dir=work,
            model_roots=tuple(getattr(args, "model_root", None) or ()),
        )
    except ValueError as e:
        raise JoinError(f"site policy: {e}") from None


def key_fingerprint(pub_line: bytes) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line ('ecdsa-sha2-nistp384 AAAA...')."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_inputs(args: argparse.Namespace) -> tuple[str, dict]:
    """Validate everything local before any connection. -> (site name, summary counts)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedtune.common.config import DataConfig
    from fedtune.common.data import DataError, load_site_data, tolerance_problem

    host, sep, port = args.server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise JoinError(f"--server {args.server!r}: expected HOST:PORT, e.g. coordinator.example:8000")
    counts = {}
    for label, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise JoinError(f"{label} {path}: file not found")
        try:
            d = load_site_data(path, DataConfig(max_invalid_fraction=1.0))
        except DataError as e:
            raise JoinError(f"{label}: {e}") from None
        if not d.examples:
            raise JoinError(
                f"{label} {path}: no usable record among {d.records_read} (run 'ftclient check --data {path}' for details)"
            )
        counts[label] = (len(d.examples), d.n_invalid)
        # The coordinator's data.max_invalid_fraction decides at each round; at the default, say now.
        if (over := tolerance_problem(d.n_invalid, d.records_read, DataConfig().max_invalid_fraction)) is not None:
            print(
                f"ftclient: warning: {label} {path}: {over}. The coordinator's setting decides; at the default this "
                f"site sends no update ('ftclient check --data {path}' lists the problems)",
                file=sys.stderr,
                flush=True,
            )
    if args.threads is not None and args.threads < 1:
        raise JoinError(f"--threads {args.threads}: expected at least 1")
    if getattr(args, "peer_keys", None):
        from .secure import load_pins

        try:
            load_pins(args.peer_keys)
        except ValueError as e:
            raise JoinError(f"--peer-keys: {e}") from None
    if args.insecure:
        return args.name or socket.gethostname(), counts
    if not args.ca_cert:
        raise JoinError("TLS is on: pass --ca-cert FILE (the coordinator's ca.crt), or --insecure for a test network")
    if not args.key:
        raise JoinError(
            "site authentication is on with TLS: pass --key FILE (make it with 'ftclient keygen --out DIR'; send DIR/site_key.pub to the coordinator)"
        )
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(Path(args.ca_cert).read_bytes())
    except (OSError, ValueError) as e:
        raise JoinError(f"--ca-cert {args.ca_cert}: not a readable PEM certificate ({type(e).__name__})") from None
    try:
        key = serialization.load_ssh_private_key(Path(args.key).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise JoinError(
            f"--key {args.key}: not a readable OpenSSH private key ({type(e).__name__}); use site_key from 'ftclient keygen'"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise JoinError(f"--key {args.key}: expected an ECDSA P-384 key (ftclient keygen makes one)")
    return args.name or socket.gethostname(), counts


SITE_STATE = "site-state"  # under --work-dir: what the site keeps to itself (federation.personalization)


def node_config(site: str, args: argparse.Namespace, verbose: bool = False, state_dir: Path | None = None) -> str:
    """The SuperNode's node config (:class:`fedtune.common.messages.NodeConfig`): where this
    site's data is (it never leaves this machine), its name and rank, ``verbose`` (ftclient
    prints the site's progress; ftsim's virtual sites do not) and ``state_dir``, the folder its
    private part lives in when a run personalizes (client/personal.py)."""
    from fedtune.common.messages import MessageError, NodeConfig

    if getattr(args, "rank", None) is not None and args.rank < 1:
        raise JoinError(f"--rank {args.rank}: expected a positive LoRA rank")
    try:
        nc = NodeConfig(
            site_name=site,
            data_path=str(Path(args.data).resolve()),
            eval_data_path=str(Path(args.eval_data).resolve()) if args.eval_data else None,
            lora_rank=int(args.rank) if getattr(args, "rank", None) is not None else None,
            verbose=verbose,
            state_dir=str(state_dir) if state_dir is not None else None,
        )
        return flwr_config_string(nc.to_record())
    except MessageError as e:
        raise JoinError(f"--name/--data/--eval-data: {e}") from None
    except ValueError as e:
        raise JoinError(str(e)) from None


def say(msg: str) -> None:
    """ftclient's own progress line on stderr (the site operator's console)."""
    print(f"[ftclient {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def work_dir(args: argparse.Namespace) -> Path:
    """The folder for the SuperNode's log and the runtime secret (--work-dir, else a new temp
    folder), made private to this user."""
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="ftclient-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    return work


def supernode_command(args: argparse.Namespace, port: int, secret_file: Path, node_cfg: str) -> list[str]:
    """The Flower SuperNode's command line: dial --server (TLS with --ca-cert, or --insecure),
    sign in with --key, and serve tasks on 127.0.0.1:``port`` only to the holder of ``secret_file``."""
    cmd = [
        sys.executable, "-m", "fedtune.client.supernode",  # flower-supernode, with shorter polls
        "--superlink", args.server,
        "--isolation", "process",  # no SuperExec: this process serves the tasks
        "--host", "127.0.0.1",
        "--port", str(port),
        "--superexec-auth-secret-file", str(secret_file),
        "--node-config", node_cfg,
    ]  # fmt: skip
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(args.ca_cert).resolve())]
    if args.key:
        cmd += ["--auth-supernode-private-key", str(Path(args.key).resolve())]
    return cmd


def key_note(args: argparse.Namespace) -> str:
    """'site_key.pub path, its fingerprint' when --key has its .pub beside it, else ''."""
    pub = Path(args.key).with_name(Path(args.key).name + ".pub") if args.key else None
    return f"{pub}, {key_fingerprint(pub.read_bytes())}" if pub is not None and pub.is_file() else ""


def announce(args: argparse.Namespace, site: str, counts: dict, log: Path, policy) -> str:
    """What this site is about to do: its data, device and coordinator, its key, the log, its
    policy. -> the key's note (:func:`key_note`), which a refusal repeats."""
    ev = counts.get("--eval-data")
    say(
        f"site {site}: {counts['--data'][0]} training records ({counts['--data'][1]} unusable)"
        + (f", {ev[0]} evaluation records" if ev else ", evaluation on a held-out split")
        + f"; device {args.device}; joining {args.server} ({'NO TLS' if args.insecure else 'TLS'})"
    )
    note = key_note(args)
    if note:
        say(f"site key ({note})")
    say(f"SuperNode log: {log}")
    for line in policy.describe():
        say(f"site policy: {line}")
    return note


def site_identity(args: argparse.Namespace):
    """The key secure aggregation signs with: the site key the SuperNode signs in with (read here,
    never sent; without --key, i.e. --insecure, one made for this process, trusted on first use),
    and the --peer-keys pins."""
    from fedtune.common.secagg import load_identity, new_identity

    from .secure import Identity, load_pins

    identity = Identity(
        load_identity(Path(args.key).read_bytes()) if args.key else new_identity(),
        load_pins(args.peer_keys) if args.peer_keys else None,
    )
    if identity.pinned is not None:
        say(
            f"secure aggregation: shares secrets only with the {len(identity.pinned)} site key(s) pinned in {args.peer_keys}"
        )
    return identity


@dataclass
class NodeOutput:
    """What ftclient learns from the SuperNode's log, line by line: whether the coordinator
    refused this site's key (:data:`REFUSED_MARKERS`) and whether TLS failed on the server's
    certificate. :meth:`read` also says which lines the site's operator sees."""

    refused: bool = False
    tls: bool = False

    def read(self, line: str) -> str | None:
        """Note what ``line`` tells; -> the line to show the operator (ANSI colours stripped), or None."""
        text = ANSI.sub("", line).strip()
        tls = "CERTIFICATE_VERIFY_FAILED" in text
        if any(m in text for m in REFUSED_MARKERS):
            self.refused = True
        self.tls |= tls
        if "EXPERIMENTAL: SuperExec authentication" in text:
            return None  # Flower's notice about the secret we use for the local task API; not for the site's operator
        if text.startswith(("ERROR", "WARNING")) or tls:
            return text
        return None

    def relay(self, line: str) -> None:
        text = self.read(line)
        if text is not None:
            say(f"SuperNode: {text}")


def node_exit(
    args: argparse.Namespace, seen: NodeOutput, note: str, returncode: int | None, log: Path
) -> tuple[int, str]:
    """Why the SuperNode stopped, as ftclient tells it: -> (exit code, message). A refused key
    (:data:`EXIT_REFUSED`) and a TLS failure say what to do; else the SuperNode's code and log tail."""
    if seen.refused:
        fp = f" ({note})" if note else ""
        return EXIT_REFUSED, (
            f"ftclient: REFUSED by the coordinator at {args.server}: this site's key{fp} is not registered there. "
            "Send site_key.pub to the coordinator, who adds it to ftserver's --authorized-keys folder; then start ftclient again."
        )
    if seen.tls:
        return exits.FAILED, (
            f"ftclient: TLS: the server at {args.server} presented a certificate that --ca-cert {args.ca_cert} does not vouch for "
            "(another CA, or a host name the certificate does not list). Get the coordinator's current ca.crt, and dial a "
            "name or IP given to 'ftserver init --host'."
        )
    return exits.FAILED, f"ftclient: the SuperNode exited (code {returncode}); its log ({log}):\n{tail(log)}"


def run_site(args: argparse.Namespace, cmd: list[str], log: Path, port: int, secret: bytes, policy, note: str) -> int:
    """Start the SuperNode, serve its tasks in this process until it exits or ftclient is stopped
    (Ctrl-C, SIGTERM: 0), relaying its warnings; -> ftclient's exit code (:func:`node_exit`)."""
    from .app import handle
    from .policy import install as install_policy
    from .worker import ResidentExecutor

    identity = site_identity(args)
    device = None if args.device == "auto" else args.device
    say(f"training on {set_threads(args.threads)} CPU thread(s) (--threads N to choose)")
    install_policy(policy)  # also for the paths that load a model without being handed one (key advertisement)
    node = spawn(cmd, log, env=tool_env())
    executor = ResidentExecutor(
        f"127.0.0.1:{port}", lambda m, c, t, r: handle(m, c, t, r, device, identity, policy=policy), secret=secret
    )
    log_stop = threading.Event()
    seen = NodeOutput()

    def watch_node() -> None:
        node.wait()
        executor.stop()

    follower = threading.Thread(target=follow, args=(log, log_stop, seen.relay), daemon=True)
    follower.start()
    threading.Thread(target=watch_node, daemon=True).start()
    sigterm_as_interrupt()
    code = exits.OK
    try:
        say("ready; runs until stopped (Ctrl-C). The model loads with the first task and then stays loaded")
        executor.serve()
        log_stop.set()
        follower.join(5)  # it reads the SuperNode's log to its end once stopped
        code, text = node_exit(args, seen, note, node.returncode, log)
        print(text, file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        say(f"stopping ({executor.tasks_done} task(s) served)")
        code = exits.OK  # stopped by its operator: the site's normal end
    finally:
        executor.stop()
        log_stop.set()
        stop(node, 10)
    return code


def join(args: argparse.Namespace) -> int:
    """ftclient's join: check everything local, then run the site (:func:`run_site`); -> the exit
    code (2: a bad flag or input, before anything starts)."""
    try:
        site, counts = check_inputs(args)
        work = work_dir(args)
        # a site's operator follows its rounds; a personalized run keeps the private part in the work folder
        node_cfg = node_config(site, args, verbose=True, state_dir=work / SITE_STATE)
    except JoinError as e:
        print(f"ftclient: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    try:
        policy = site_policy(args, work)
    except JoinError as e:
        print(f"ftclient: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    secret = os.urandom(32)
    write_private_file(work / "runtime.secret", secret)
    port = free_port()
    log = work / "supernode.log"
    cmd = supernode_command(args, port, work / "runtime.secret", node_cfg)
    note = announce(args, site, counts, log, policy)
    return run_site(args, cmd, log, port, secret, policy, note)
