"""Shared helpers for the fedtune benchmarks: paths, statistics, ftsim subprocesses, and a
process-tree memory sampler that also makes sure nothing is left behind.

psutil is needed here (it arrives with ray today, but the benchmarks use it directly, so it
belongs in a ``bench`` extra / dev dependency of its own).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:  # pragma: no cover - told to the user, not hidden
    sys.exit("benchmarks need psutil: pip install psutil (into the project's venv)")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "simulations" / "configs" / "default.yaml"
DATA = REPO / "simulations" / "data"
DOMAINS = ("medical", "legal", "financial")
SESSION_RE = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def site_specs(n: int) -> list[str]:
    """n ftsim --site specs that reuse the bundled files: medical-1, legal-1, financial-1, medical-2, ..."""
    out = []
    for i in range(n):
        d = DOMAINS[i % len(DOMAINS)]
        out.append(f"{d}-{i // len(DOMAINS) + 1}={DATA / d / 'train.jsonl'}:{DATA / d / 'eval.jsonl'}")
    return out


# ------------------------------------------------------------------ process-tree memory


def _role(p: psutil.Process, root_pid: int | None = None) -> str:
    """A readable name for a process in ftsim's tree (Ray retitles its workers, so ask each time)."""
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    if p.pid == root_pid:
        return "ftsim driver (ServerApp, simulation engine)"
    if "ClientAppActor" in cmd:
        return "ray ClientAppActor (site worker)"
    if cmd.startswith("ray::"):
        return f"ray worker {cmd.split()[0]}"
    if "default_worker.py" in cmd:
        return "ray worker (starting)"
    exe = cmd.split()[0] if cmd else name
    for key in ("raylet", "gcs_server"):
        if exe.endswith("/" + key):
            return f"ray {key}"
    for script in (
        "dashboard/agent.py",
        "runtime_env/agent/main.py",
        "dashboard/dashboard.py",
        "log_monitor.py",
        "monitor.py",
    ):
        if script in cmd:
            return f"ray {script.split('/')[-1] if script != 'runtime_env/agent/main.py' else 'runtime_env agent'}"
    return name[:40]


@dataclass
class TreeSampler:
    """Samples the summed RSS of a process and all its descendants every ``interval`` s.

    RSS summed over processes counts shared pages (libraries, Ray's shared-memory object
    store) once per process that maps them: an upper bound, but the same bound for both
    runs being compared.
    """

    root_pid: int
    interval: float = 0.2
    peak_bytes: int = 0
    peak_breakdown: dict = field(default_factory=dict)
    peak_nprocs: int = 0
    role_peaks: dict = field(default_factory=dict)  # each role's own maximum, whenever it happened
    samples: int = 0
    seen: dict = field(default_factory=dict)  # pid -> (create_time, role)
    sessions: set = field(default_factory=set)  # Ray session dirs seen in our tree

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total, breakdown, n = 0, {}, 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                role = _role(p, self.root_pid)
                if p.pid not in self.seen:
                    self.sessions.update(SESSION_RE.findall(" ".join(p.cmdline())))
                self.seen[p.pid] = (p.create_time(), role)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            n += 1
            breakdown[role] = breakdown.get(role, 0) + rss
        self.samples += 1
        for role, b in breakdown.items():
            self.role_peaks[role] = max(self.role_peaks.get(role, 0), b)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_breakdown, self.peak_nprocs = total, breakdown, n

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def leftovers(self, wait_s: float = 15.0) -> list[dict]:
        """Processes from our tree (or our Ray sessions) still alive after ftsim exited."""
        deadline = time.time() + wait_s
        while True:
            alive = []
            for pid, (ctime, role) in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if abs(p.create_time() - ctime) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append({"pid": pid, "role": role})
                except psutil.NoSuchProcess:
                    pass
            known = {a["pid"] for a in alive}
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if p.info["pid"] not in known and p.info["pid"] != os.getpid() and any(s in cmd for s in self.sessions):
                    alive.append({"pid": p.info["pid"], "role": _role(p)})
            if not alive or time.time() > deadline:
                return alive
            time.sleep(1.0)

    def kill_leftovers(self, alive: list[dict]) -> None:
        """Ends, by pid, only processes this benchmark started (seen in its tree/session)."""
        for a in alive:
            try:
                psutil.Process(a["pid"]).kill()
            except psutil.NoSuchProcess:
                pass


# ------------------------------------------------------------------ ftsim as a subprocess


@dataclass
class SimRun:
    args: list[str]
    out: Path
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    peak_breakdown: dict
    peak_nprocs: int
    role_peaks: dict
    samples: int
    leftovers: list
    log: Path

    def metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())


def run_ftsim(
    args: list[str], out: Path, interval: float = 0.2, timeout_s: float = 1800, env_extra: dict | None = None
) -> SimRun:
    """Run ``python -m fedtune.simulations.cli ARGS --out OUT`` and sample its process tree."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", *args, "--out", str(out)]
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        sampler = TreeSampler(proc.pid, interval).start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException:
            # Interrupted or too slow: end what we started (by pid), then re-raise.
            sampler.stop()
            proc.kill()
            proc.wait()
            sampler.kill_leftovers(sampler.leftovers(wait_s=0))
            raise
    wall = time.perf_counter() - t0
    sampler.stop()
    left = sampler.leftovers()
    if left:
        sampler.kill_leftovers(left)
    return SimRun(
        args=args,
        out=out,
        returncode=rc,
        wall_s=wall,
        peak_rss_bytes=sampler.peak_bytes,
        peak_breakdown=sampler.peak_breakdown,
        peak_nprocs=sampler.peak_nprocs,
        role_peaks=sampler.role_peaks,
        samples=sampler.samples,
        leftovers=left,
        log=log,
    )


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if "Warning" not in l]
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def stray_ray_processes() -> list[str]:
    """Any ray/ftsim process on the machine (ours or not), for the final report."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if p.info["pid"] == os.getpid():
            continue
        if any(k in cmd for k in ("ray::", "raylet", "gcs_server", "fedtune.simulations.cli", "/bin/ftsim")):
            out.append(f"{p.info['pid']} {cmd[:100]}")
    return out
