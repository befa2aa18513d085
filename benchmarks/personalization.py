"""Does each site's personalized model beat training alone, and the global model, on its own data?

    python benchmarks/personalization.py                          # the demo, every method (~45 min on 2 cores)
    python benchmarks/personalization.py --dataset demo --only dual
    python benchmarks/personalization.py --quick                  # 1 round of 2 steps: a smoke run

For each data set the first method run carries ``--baselines`` (base model, each site alone,
all data pooled, at the federation's compute; see simulations/baselines.py); every other method is
the same ``ftsim`` run with only ``--personalize`` changed (same seed, data, rounds x local steps),
so the baselines apply to it, and its global model is the same as the first's (personalization
never changes what travels). A method's figures are its last round's evaluation at each site:
the global adapter's and the site's personalized model's, on the same validation split
(metrics.json). The private steps (``federation.personal_steps``, default the local steps) come
on top of the federation's compute: the table says how many.

Data sets:

- ``demo``: the built-in demo (3 sites, 3 distinct domains), its own config;
- ``iid4``: ../shared/data finance and medical pooled and split IID into 4 sites (the README's
  experiment: 3 rounds x 5 steps, lr 1e-3, max length 256);
- ``dirichlet``: the same two files split Dirichlet(0.3) over 4 sites by domain.

A method's folder that already holds a finished run with the same arguments is reused (its
commit is printed); ``--fresh`` reruns everything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import REPO, say
from learning_speed import DEMO, QUICK, SHARED, fmt, run_candidates, site_scores, weighted, write_tables

SHARED_FILES = ["--data", str(SHARED / "finance" / "train.jsonl"), "--data", str(SHARED / "medical" / "train.jsonl")]
SMALL = ["--rounds", "3", "--local-steps", "5", "--lr", "1e-3", "--max-length", "256"]
DATASETS = {
    "demo": ["--config", str(DEMO)],
    "iid4": [*SHARED_FILES, "--partition", "iid", "--sites", "4", *SMALL],
    "dirichlet": [*SHARED_FILES, "--partition", "dirichlet:0.3", "--sites", "4", *SMALL],
}
METHODS = {
    "dual": ["--personalize", "dual"],
    "finetune": ["--personalize", "finetune"],
}


def personal_scores(doc: dict) -> dict[str, dict]:
    """The last trained round's personalized scores per site, as baseline-style scores."""
    last = next(r for r in reversed(doc["rounds"]) if r["round"] > 0 and not r.get("skipped"))
    out = {}
    for n, s in last["sites"].items():
        if s.get("personal_eval_loss") is not None:
            out[n] = {"eval_loss": s["personal_eval_loss"], "exact_match": s.get("personal_exact_match"),
                      "eval_examples": s.get("eval_examples"), "steps": s.get("personal_steps")}  # fmt: skip
    return out


def table(name: str, rows: dict[str, tuple[dict, dict] | None], baselines: dict, sites: list[str]) -> list[str]:
    """Per site: eval loss / exact match under base, alone, pooled, and each method's global and
    personalized model, with the personalized model against the site alone."""
    b = baselines["sites"]
    head = ["training", *(f"{n}: loss / EM" for n in sites), "mean loss", "personalized against alone (loss)"]
    out = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cells(scores: dict) -> str:
        return " | ".join(
            f"{fmt((scores.get(n) or {}).get('eval_loss'))} / {fmt((scores.get(n) or {}).get('exact_match'), '.2f')}"
            for n in sites
        )

    for t, label in (("base", "base model"), ("alone", "each site alone"), ("pooled", "all data pooled")):
        scores = {n: b[n][t] for n in sites}
        out.append(f"| {label} | {cells(scores)} | {fmt(weighted(scores, 'eval_loss'))} | |")
    alone = {n: (b[n]["alone"] or {}).get("eval_loss") for n in sites}
    for method, pair in rows.items():
        if pair is None:
            out.append(f"| {method} | failed |" + " |" * (len(head) - 2))
            continue
        glob, pers = pair
        steps = sorted({s.get("steps") for s in pers.values() if s.get("steps") is not None})
        out.append(f"| {method}: global | {cells(glob)} | {fmt(weighted(glob, 'eval_loss'))} | |")
        d = {n: pers[n]["eval_loss"] - alone[n] for n in sites if n in pers and alone[n] is not None}
        verdict = (
            ", ".join(f"{n} {x:+.3f}" for n, x in d.items())
            + f" (better at {sum(x < 0 for x in d.values())} of {len(d)})"
        )
        out.append(
            f"| {method}: personalized ({'/'.join(map(str, steps))} private steps a round) | {cells(pers)} | "
            f"{fmt(weighted(pers, 'eval_loss'))} | {verdict} |"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "personalization"))
    ap.add_argument("--dataset", action="append", choices=list(DATASETS), help="only these data sets (repeatable)")
    ap.add_argument("--only", action="append", choices=list(METHODS), help="only these methods (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="rerun methods whose folder holds a finished run")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps, 4 eval examples")
    args = ap.parse_args()
    out = Path(args.out)
    quick = QUICK if args.quick else []
    report = []
    for ds in args.dataset or ["demo"]:
        wanted = [m for m in METHODS if not args.only or m in args.only]
        rows, baselines, sites = run_candidates(
            ds, DATASETS[ds], {m: METHODS[m] for m in wanted}, out, args.fresh, quick,
            lambda doc: (site_scores(doc), personal_scores(doc)),
        )  # fmt: skip
        if baselines is None:
            say(f"{ds}: no baselines (the first run failed): no table")
            continue
        report += table(ds, rows, baselines, sites) + [""]
    write_tables(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
