"""How fast does the federated global model learn, against pooled training at equal compute?

    python benchmarks/learning_speed.py                  # every data set, every candidate (hours on 2 cores: 15-30 min a run)
    python benchmarks/learning_speed.py --dataset demo --only "fedavg, server lr K"
    python benchmarks/learning_speed.py --quick          # 1 round of 2 steps, 4 eval examples: a smoke run

For each data set, the first candidate run (plain FedAvg, or with ``--only`` the first chosen) runs with ``--baselines``: base model, each site alone, all data pooled, at the federation's
compute (see simulations/baselines.py), each alone model also scored on every site's split.
Every other candidate is the same ``ftsim`` run with only its aggregation flags changed (same
seed, data, rounds x local steps unless the candidate is a split of the same compute), so the
baselines apply to it. A candidate's figures are its last round's evaluation at each site
(metrics.json), the same scores the baselines table uses.

Data sets:

- ``demo``: the built-in demo (3 sites, 3 distinct domains: medical, legal, financial), its own
  config (3 rounds x 10 local steps of 4, lr 1e-3);
- ``domains``: ../shared/data finance and medical, one site per domain (``--partition domain``);
- ``iid``: the same two files pooled and split IID into 2 sites, the easy case (the same K as ``domains``).

The second and third run on the demo's config with the shared files as data. The table gives,
per site, eval loss and exact match and the share of pooled training's gain over the base model
that the candidate reached (100%: as far as pooled; above: further), and, on the mean over sites,
whether it beat every site alone scored on all sites' splits. A candidate's folder that already
holds a finished run with the same arguments is reused (its commit is printed), so a run that
stopped continues; ``--fresh`` reruns everything.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from _common import REPO, log_tail, run_ftsim, say

from fedtune.common.metrics import weighted_scores
from fedtune.simulations.report_sections import gain_share

SHARED = REPO.parent / "shared" / "data"
DEMO = REPO / "simulations" / "configs" / "default.yaml"

DATASETS = {
    "demo": ["--config", str(DEMO)],
    "domains": ["--config", str(DEMO), "--data", str(SHARED / "finance" / "train.jsonl"),
                "--data", str(SHARED / "medical" / "train.jsonl"), "--partition", "domain"],
    "iid": ["--config", str(DEMO), "--data", str(SHARED / "finance" / "train.jsonl"),
            "--data", str(SHARED / "medical" / "train.jsonl"), "--partition", "iid", "--sites", "2"],
}  # fmt: skip
N_SITES = {"demo": 3, "domains": 2, "iid": 2}


# The first candidate run carries --baselines (base, alone, pooled: the same for every candidate of
# the same rounds x steps). "secure aggregation" and "DP" run the chosen default (WINNER).
WINNER = ["--strategy", "fedavg", "--set", "federation.server_lr=sites"]


def candidates(k: int) -> dict[str, list[str]]:
    """name -> the flags that make it (``k``: the number of sites)."""
    return {
        "fedavg, server lr 1 (FedAvg)": ["--strategy", "fedavg", "--set", "federation.server_lr=1"],
        f"fedavg, server lr sqrt(K) = {math.sqrt(k):.2f}": ["--strategy", "fedavg", "--set", f"federation.server_lr={math.sqrt(k):.4f}"],
        f"fedavg, server lr K = {k} ('sites')": WINNER,
        f"fedavg, server lr 2K = {2 * k}": ["--strategy", "fedavg", "--set", f"federation.server_lr={2 * k}"],
        "fedavgm, server lr 1, momentum 0.9": ["--strategy", "fedavgm", "--set", "federation.server_lr=1"],
        "fedavgm, server lr K, momentum 0.9": ["--strategy", "fedavgm", "--set", "federation.server_lr=sites"],
        "fedadam, server lr 3e-3": ["--strategy", "fedadam", "--set", "federation.server_lr=3e-3"],
        # The demo config's lr (1e-3) times sqrt(K): pooled Adam, normalizing each mixed batch's gradient, moves each
        # of K orthogonal domain directions by about sqrt(K) x what a site's own steps move it (benchmarks/README.md).
        "fedavg, server lr K, local lr x sqrt(K)": [*WINNER, "--lr", f"{math.sqrt(k):.4f}e-3"],
        # The same, K x: on the domains the medical site (the one short of pooled's gain) kept improving with distance.
        "fedavg, server lr K, local lr x K": [*WINNER, "--lr", f"{k}e-3"],
        "fedavg, server lr K, 6 rounds x 5 steps": [*WINNER, "--rounds", "6", "--local-steps", "5"],
        "fedavg, server lr K, 10 rounds x 3 steps": [*WINNER, "--rounds", "10", "--local-steps", "3"],
        "server lr K + FFA-LoRA (A frozen, exact aggregation)": [*WINNER, "--set", "peft.ffa=true"],
        "server lr K + secure aggregation": [*WINNER, "--secure-aggregation"],
        "server lr K + DP (epsilon 8)": [*WINNER, "--dp-epsilon", "8"],
    }  # fmt: skip


def commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def slug(name: str) -> str:
    """A candidate's folder name: its name, lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def run_one(args: list[str], out: Path, fresh: bool) -> dict | None:
    """ftsim ARGS --out OUT -> its metrics.json (reused when OUT already holds a finished run of ARGS)."""
    stamp = out.parent / f"{out.name}.args.json"
    if not fresh and stamp.is_file() and (out / "metrics.json").is_file():
        kept = json.loads(stamp.read_text())
        if kept.get("args") == args and kept.get("rc") == 0:
            say(f"  reusing {out} (ran at {kept.get('commit')}, {kept.get('wall_s')} s)")
            return json.loads((out / "metrics.json").read_text())
    run = run_ftsim(args, out, timeout_s=7200)
    stamp.write_text(json.dumps({"args": args, "rc": run.returncode, "commit": commit(), "wall_s": round(run.wall_s)}))
    if run.returncode != 0:
        say(f"  ftsim failed (rc {run.returncode}):\n{log_tail(run.log)}")
        return None
    say(f"  done in {run.wall_s:.0f} s")
    return run.metrics()


def site_scores(doc: dict) -> dict[str, dict]:
    """The last trained round's evaluation per site: {site: {eval_loss, exact_match, eval_examples}}."""
    last = next(r for r in reversed(doc["rounds"]) if r["round"] > 0 and not r.get("skipped"))
    return {n: s for n, s in last["sites"].items() if s.get("eval_loss") is not None}


def weighted(scores: dict[str, dict | None], key: str) -> float | None:
    """The example-weighted mean of ``key`` over the sites, as metrics.json's means."""
    return weighted_scores(scores.values(), (key,)).get(key)


def share(value, base, ref, lower_is_better: bool) -> float | None:
    """``value``'s gain over ``base`` as a share of ``ref``'s, as the baselines report computes it."""
    return gain_share({"base": base, "federation": value, "ref": ref}, "ref", lower_is_better)


def fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def table(name: str, rows: dict[str, dict], baselines: dict, sites: list[str]) -> list[str]:
    """The data set's markdown table: reference rows (base, alone, pooled), then one row per candidate."""
    b_sites = baselines["sites"]
    base = {n: b_sites[n]["base"] for n in sites}
    pooled = {n: b_sites[n]["pooled"] for n in sites}
    cross = baselines.get("alone_on_all") or {}
    alone_means = {t: weighted(by_site, "eval_loss") for t, by_site in cross.items()}
    best_alone = min((v for v in alone_means.values() if v is not None), default=None)
    head = ["training"] + [f"{n}: loss (share of pooled gain) / EM" for n in sites]
    head += ["mean loss", "lowest share", "beats every alone on all splits"]
    out = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cells(scores: dict) -> list[str]:
        c = []
        for n in sites:
            s = scores.get(n) or {}
            sh = share(s.get("eval_loss"), (base[n] or {}).get("eval_loss"), (pooled[n] or {}).get("eval_loss"), True)
            c.append(f"{fmt(s.get('eval_loss'))} ({fmt(sh, '.0%')}) / {fmt(s.get('exact_match'), '.2f')}")
        return c

    def shares(scores: dict) -> list[float]:
        xs = [
            share((scores.get(n) or {}).get("eval_loss"), (base[n] or {}).get("eval_loss"),
                  (pooled[n] or {}).get("eval_loss"), True)
            for n in sites
        ]  # fmt: skip
        return [x for x in xs if x is not None]

    out.append("| base model | " + " | ".join(cells(base)) + f" | {fmt(weighted(base, 'eval_loss'))} | | |")
    alone = {n: b_sites[n]["alone"] for n in sites}
    out.append(
        "| each site alone (own split) | " + " | ".join(cells(alone)) + f" | {fmt(weighted(alone, 'eval_loss'))} | | |"
    )
    for t, m in alone_means.items():
        out.append(f"| {t} alone, on all splits | " + " | ".join(cells(cross[t])) + f" | {fmt(m)} | | |")
    out.append("| all data pooled | " + " | ".join(cells(pooled)) + f" | {fmt(weighted(pooled, 'eval_loss'))} | | |")
    for cand, scores in rows.items():
        if scores is None:
            out.append(f"| {cand} | failed |" + " |" * (len(head) - 2))
            continue
        mean, sh = weighted(scores, "eval_loss"), shares(scores)
        beats = "–" if best_alone is None or mean is None else ("yes" if mean < best_alone else "no")
        out.append(
            f"| {cand} | "
            + " | ".join(cells(scores))
            + f" | {fmt(mean)} | {fmt(min(sh) if sh else None, '.0%')} | {beats} |"
        )
    return out


QUICK = ["--rounds", "1", "--local-steps", "2", "--set", "eval.max_examples=4"]


def run_candidates(
    ds: str, base: list[str], cands: dict[str, list[str]], out: Path, fresh: bool, quick: list[str], score
) -> tuple[dict, dict | None, list[str]]:
    """Data set ``ds``: ftsim BASE + each candidate's flags (the first with ``--baselines``), each in
    ``out/ds/<slug>`` (a finished run is reused) -> ({candidate: score(metrics.json) or None when it
    failed}, the first run's baselines, their sites)."""
    rows, baselines, sites = {}, None, []
    for i, (cand, flags) in enumerate(cands.items()):
        extra = flags + (["--baselines"] if i == 0 else [])
        say(f"{ds} / {cand}: ftsim {' '.join(extra)}")
        doc = run_one(base + extra + ["--no-plots"] + quick, out / ds / slug(cand), fresh)
        if doc is None:
            rows[cand] = None
            continue
        if i == 0:
            baselines = doc.get("baselines")
            sites = list(baselines["sites"]) if baselines else []
        rows[cand] = score(doc)
        last = site_scores(doc)
        say(f"  {json.dumps({n: (s['eval_loss'], s.get('exact_match')) for n, s in last.items()})}")
    return rows, baselines, sites


def write_tables(out: Path, report: list[str]) -> None:
    """The tables to ``out/tables.md`` and the console."""
    text = "\n".join(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    print("\n" + text)
    print(f"tables: {out / 'tables.md'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "learning_speed"))
    ap.add_argument("--dataset", action="append", choices=list(DATASETS), help="only these data sets (repeatable)")
    ap.add_argument(
        "--only", action="append", metavar="PREFIX", help="only candidates whose name starts so (repeatable)"
    )
    ap.add_argument("--fresh", action="store_true", help="rerun candidates whose folder holds a finished run")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps, 4 eval examples")
    args = ap.parse_args()
    out = Path(args.out)
    quick = QUICK if args.quick else []
    report = []
    for ds in args.dataset or list(DATASETS):
        cands = candidates(N_SITES[ds])
        wanted = [c for c in cands if not args.only or any(c.startswith(p) for p in args.only)]
        if not wanted:
            say(f"{ds}: no candidate starts with {args.only}; the candidates: {list(cands)}")
            return 2
        rows, baselines, sites = run_candidates(
            ds, DATASETS[ds], {c: cands[c] for c in wanted}, out, args.fresh, quick, site_scores
        )
        if baselines is None:
            say(f"{ds}: no baselines (the first run failed): no table")
            continue
        report += table(ds, rows, baselines, sites) + [""]
    write_tables(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
