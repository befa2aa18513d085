"""A real deployment on this machine: ftserver + three registered ftclients + one intruder.

    python -m fedtune.simulations.deploy_localhost --rounds N --out DIR

Everything runs as separate processes talking over TLS on localhost, exactly as on separate
machines: fresh certificates (``ftserver init``), a key pair per site (``ftclient keygen``),
the three bundled sites (medical, legal, financial) registered with the coordinator, and a
fourth site whose key is not registered, which must be refused. Progress streams from the
coordinator; at the end DIR holds what ftsim leaves (``adapter/``, ``metrics.json``,
``report.md``, ``checkpoints/``), plus ``deploy/`` (certificates, keys, per-process logs).
Every process started here is stopped before it returns. Exit code 0 only when the run
completed and the intruder was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtune.common.procs import free_port, sigterm_as_interrupt, spawn, stop, tail, tool, tool_env
from fedtune.simulations.cli import DEFAULT_CONFIG, bundled_path

SITES = ("medical", "legal", "financial")
INTRUDER = "intruder"
REFUSED_EXIT = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedtune.simulations.deploy_localhost",
        description="Run ftserver, three registered ftclients and one unregistered ftclient on this machine, over TLS.",
    )
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--out", required=True, help="output folder (must not already hold a run)")
    p.add_argument("--config", help="run config (default: the bundled demo config, default model)")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--threads-per-site", type=int, help="CPU threads per site (default: cores / 3, at least 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable)")
    return p


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = self.out / "deploy"
        self.procs: dict[str, subprocess.Popen] = {}
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        el = int(time.time() - self.t0)
        print(f"[deploy {el // 60:02d}:{el % 60:02d}] {msg}", flush=True)

    def prepare(self) -> int:
        from fedtune.client.keys import create_site_keys
        from fedtune.common.config import load_config
        from fedtune.common.modeling import resolve_model_source
        from fedtune.server.certs import create_certificates

        if (self.out / "metrics.json").exists():
            raise SystemExit(f"deploy_localhost: --out {self.out} already holds a run; choose a new folder")
        pki = self.work / "pki"
        create_certificates(pki, ["localhost", "127.0.0.1"], days=7, force=True)
        authorized = self.work / "authorized-keys"
        authorized.mkdir(parents=True, exist_ok=True)
        for old in authorized.glob("*.pub"):
            old.unlink()
        for name in (*SITES, INTRUDER):
            create_site_keys(self.work / "sites" / name, force=True)
        for name in SITES:  # the intruder's key is made but never handed to the coordinator
            (authorized / f"{name}.pub").write_bytes((self.work / "sites" / name / "site_key.pub").read_bytes())
        (self.work / "logs").mkdir(exist_ok=True)
        self.say(
            f"fresh certificates in {pki}; site keys for {', '.join(SITES)} registered; '{INTRUDER}' has a key nobody registered"
        )
        # Provision the model once here, so four processes don't all start by fetching it.
        cfg = load_config(self.args.config or bundled_path("configs", DEFAULT_CONFIG))
        resolve_model_source(cfg.model)
        return self.args.port or free_port()

    def start_server(self, port: int) -> subprocess.Popen:
        cmd = [
            tool("ftserver"),
            "--certs", str(self.work / "pki"),
            "--authorized-keys", str(self.work / "authorized-keys"),
            "--port", str(port),
            "--out", str(self.out),
            "--rounds", str(self.args.rounds),
            "--expected-sites", str(len(SITES)),
            "--min-sites", "2",
            "--join-timeout", "300",
        ]  # fmt: skip
        cmd += [
            "--config",
            str(Path(self.args.config).resolve() if self.args.config else bundled_path("configs", DEFAULT_CONFIG)),
        ]
        for s in self.args.set:
            cmd += ["--set", s]
        proc = spawn(cmd, None, env=tool_env())
        self.procs["ftserver"] = proc

        def relay() -> None:
            for raw in proc.stdout:
                print(raw.decode(errors="replace").rstrip("\n"), flush=True)

        threading.Thread(target=relay, daemon=True).start()
        return proc

    def start_site(self, name: str, port: int, threads: int) -> subprocess.Popen:
        data = bundled_path("data", name if name in SITES else "medical")
        keys = self.work / "sites" / name
        cmd = [
            tool("ftclient"),
            "--server", f"127.0.0.1:{port}",
            "--data", str(data / "train.jsonl"),
            "--eval-data", str(data / "eval.jsonl"),
            "--name", name,
            "--ca-cert", str(self.work / "pki" / "ca.crt"),
            "--key", str(keys / "site_key"),
            "--threads", str(threads),
            "--work-dir", str(keys / "runtime"),
        ]  # fmt: skip
        proc = spawn(cmd, self.work / "logs" / f"{name}.log", env=tool_env())
        self.procs[name] = proc
        return proc

    def wait_refusal(self, proc: subprocess.Popen, timeout: float) -> tuple[bool, str]:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False, f"still connected after {timeout:.0f} s"
        text = tail(self.work / "logs" / f"{INTRUDER}.log", 5)
        line = next((l for l in text.splitlines() if "REFUSED" in l), text.splitlines()[-1] if text else "")
        return code == REFUSED_EXIT, f"exit code {code}: {line.strip()}"

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop(proc, 15)
        left = [n for n, p in self.procs.items() if p.poll() is None]
        if left:
            self.say(f"WARNING: could not stop {', '.join(left)}")
        else:
            self.say(f"stopped all {len(self.procs)} processes started here")

    def run(self) -> int:
        port = self.prepare()
        threads = self.args.threads_per_site or max(1, (os.cpu_count() or 1) // len(SITES))
        self.say(
            f"starting ftserver on 127.0.0.1:{port} (TLS + site authentication), {self.args.rounds} round(s); output {self.out}"
        )
        server = self.start_server(port)
        time.sleep(2)
        for name in SITES:
            self.start_site(name, port, threads)
        self.say(f"started ftclient for {', '.join(SITES)} ({threads} thread(s) each; logs in {self.work / 'logs'})")
        intruder = self.start_site(INTRUDER, port, 1)
        self.say(f"started ftclient '{INTRUDER}' with an unregistered key")
        refused, how = self.wait_refusal(intruder, 120)
        self.say(f"unregistered site: {'REFUSED' if refused else 'NOT REFUSED'} ({how})")
        exited: set[str] = set()
        while server.poll() is None:
            for name in SITES:
                p = self.procs[name]
                if p.poll() is not None and name not in exited:
                    exited.add(name)
                    self.say(
                        f"site {name} exited (code {p.returncode}); its log:\n{tail(self.work / 'logs' / f'{name}.log')}"
                    )
            time.sleep(1)
        code = server.returncode
        self.say(f"ftserver exited with code {code}")
        ok = code == 0 and refused
        if code == 0:
            doc = json.loads((self.out / "metrics.json").read_text())
            last = doc["rounds"][-1]
            agg = ", ".join(f"{k} {v:.3f}" for k, v in last.get("aggregate", {}).items())
            self.say(f"{last['round']} round(s) done; final global eval: {agg}")
            self.say(
                f"adapter: {self.out / 'adapter'}  metrics: {self.out / 'metrics.json'}  report: {self.out / 'report.md'}"
            )
        self.say(
            f"result: run {'completed' if code == 0 else 'FAILED'}; unregistered site {'refused' if refused else 'NOT refused'}"
        )
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = Demo(args)
    sigterm_as_interrupt()
    try:
        return demo.run()
    except KeyboardInterrupt:
        demo.say("interrupted")
        return 130
    finally:
        demo.stop_all()


if __name__ == "__main__":
    sys.exit(main())
