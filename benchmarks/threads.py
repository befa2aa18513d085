"""Which thread count fteval should take by default: measured on an idle and on a busy machine.

    python benchmarks/threads.py [--examples 20]

Scores the bundled medical eval file with the default model (greedy generation on, as fteval
runs by default) with ``--threads 1``, ``--threads`` = every usable core, and no ``--threads``
(the default, :func:`fedtune.common.threads.default_threads`), first on the idle machine, then
while another job keeps every core busy (a torch matmul loop on as many threads as there are
cores, like a second model job; started 70 s before, so the 1-minute load average the default
reads has risen). Each figure is fteval's own ``seconds`` (model load and scoring, not the
interpreter's start-up). Prints every time and the ratios side by side, and which count the
default chose in each case. Run it on a machine with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, say

from fedtune.common.threads import usable_cores

DATA = REPO / "simulations" / "data" / "medical" / "eval.jsonl"
BUSY = (
    "import torch, sys; torch.set_num_threads(int(sys.argv[1])); a = torch.randn(768, 768)\n"
    "while True:\n    a = torch.tanh(a @ a)"
)


def fteval(threads: int | None, examples: int, out: Path) -> tuple[float, int]:
    """One fteval run -> (its seconds, the thread count it printed)."""
    cmd = [sys.executable, "-m", "fedtune.common.fteval", "--data", str(DATA), "--max-examples", str(examples)]
    cmd += ["--out", str(out)] + (["--threads", str(threads)] if threads else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"fteval failed ({res.returncode}): {res.stderr[-2000:]}")
    used = int(re.search(r"^threads\s+(\d+)", res.stdout, re.M).group(1))
    return float(json.loads(out.read_text())["seconds"]), used


def settle(below: float = 0.3, limit_s: float = 300) -> None:
    """Wait (at most ``limit_s``) for the 1-minute load average to fall below ``below``: it lags,
    and the idle case is only idle once what ran before has left it."""
    t0 = time.time()
    while os.getloadavg()[0] >= below and time.time() - t0 < limit_s:
        time.sleep(5)


def measure(examples: int, cores: int, tmp: Path) -> dict[str, tuple[float, int]]:
    runs = {}
    for label, n in (("1 thread", 1), (f"{cores} threads", cores), ("default", None)):
        runs[label] = fteval(n, examples, tmp / f"{label}.json")
        say(f"  {label:<10} {runs[label][0]:7.1f} s  ({runs[label][1]} thread(s))")
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=20)
    args = ap.parse_args()
    cores = usable_cores()
    tmp = Path(tempfile.mkdtemp(prefix="threads-"))
    fteval(1, 2, tmp / "warm.json")  # the model provisioned and in the page cache
    settle()
    say(f"idle machine ({cores} usable cores, load {os.getloadavg()[0]:.2f}), {args.examples} examples:")
    idle = measure(args.examples, cores, tmp)
    busy_job = subprocess.Popen([sys.executable, "-c", BUSY, str(cores)])
    try:
        time.sleep(70)
        say(f"busy machine (a {cores}-thread matmul loop, load {os.getloadavg()[0]:.2f}), {args.examples} examples:")
        busy = measure(args.examples, cores, tmp)
    finally:
        busy_job.kill()
        busy_job.wait()
    many = f"{cores} threads"
    say("ratios (seconds / seconds, same run):")
    say(f"  idle: {many} / 1 thread = {idle[many][0] / idle['1 thread'][0]:.2f}")
    say(f"  busy: {many} / 1 thread = {busy[many][0] / busy['1 thread'][0]:.2f}")
    for name, runs in (("idle", idle), ("busy", busy)):
        best = min(runs["1 thread"][0], runs[many][0])
        say(
            f"  {name}: default ({runs['default'][1]} thread(s)) / the better fixed count = {runs['default'][0] / best:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
