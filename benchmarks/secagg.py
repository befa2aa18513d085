"""Secure aggregation, side by side in one run: fedtune's SecAgg+ against plain FedAvg and against
Flower 1.42's own (legacy) SecAgg+, with 10 sites and 1M and 10M parameters.

    python benchmarks/secagg.py                 # 10 sites; 1M and 10M parameters; 3 repetitions
    python benchmarks/secagg.py --quick         # 5 sites, 10k parameters, 1 repetition (smoke run)

Every round runs in ``flwr.simulation.run_simulation`` (Ray), one repetition of each kind after
the other, with no model: each virtual site's update is a given random vector (values ~1e-3,
like LoRA deltas) and its weight a given example count, so what is timed is what secure
aggregation adds, not training. Timing is the same for all three: the training round alone
(sending the global adapter, every stage, unmasking, applying the mean), after a warm-up
message has started every Ray actor (see flower_secagg.py, "What is timed").

- ours: ``fedtune.server.app.run_training_round`` with ``secure_aggregation.enabled`` on and off,
  talking to the sites' real handlers (``fedtune.client.secure``, ``client.app.handle_secure_stage``);
- Flower: ``SecAggPlusWorkflow`` + ``secaggplus_mod`` (flower_secagg.py), every site every other's
  neighbour as in ours, quantization settings as close to ours as Flower allows.

It also checks that ours and Flower's agree, within the sum of both quantization bounds.
The last line is ``key=value`` figures:

  secure_over_plain       our secure round / our plain FedAvg round (median over repetitions; no training, no goal)
  ours_over_flower        our secure round / Flower's SecAgg+ round (goal < 1)
  upload_bytes_per_param  one site's masked upload / parameters, ours (goal <= 4 a value, + O(1) bytes an
                          upload: ours carries its weight, 4 bytes, beside the values; Flower's is 8)
  upload_fixed_bytes      ours: the upload's bytes beyond 4 a value (the weight)
  flower_upload_bytes_per_param
  secure_overhead_s       our secure round minus our plain round, seconds (at the largest size)
  secure_over_plain_with_training  the same ratio for the built-in ftsim demo's rounds, training included (goal <= 1.3)
                          (default model, 3 sites; the secure stages against ~70 s of local training)
  consistency_stage_s     the signed consistency check's exchange, seconds (median, at the largest size)
  signature_*             ECDSA P-384 sign / verify ms here, and the CPU they add per round at a site and at the coordinator
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flower_secagg as fs  # noqa: E402

# The 1.3 goal is a round that trains: the protocol alone (secure_over_plain) has no goal of its own.
GOALS = {
    "secure_over_plain_with_training": ("<=", 1.3),
    "ours_over_flower": ("<", 1.0),
    "upload_bytes_per_param": ("<=", 4.0),
}


def _client_app(paths: list[str], weights: list[int]):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedtune.client import app as client_app
    from fedtune.client import secure
    from fedtune.common import adapters
    from fedtune.common.secagg import SecAggError, load_identity
    from fedtune.common.secagg import protocol as p
    from fedtune.simulations.cli import with_site_keys

    sites, _ = with_site_keys([client_app.SiteFiles(f"site{i}", path) for i, path in enumerate(paths)])
    app = ClientApp()

    def reply(msg, i, status, metrics, records=None):
        info = ConfigRecord({"name": sites[i].name, "status": status})
        return Message(
            content=RecordDict({"metrics": MetricRecord(metrics), "site": info, **(records or {})}), reply_to=msg
        )

    @app.train()
    def train(msg, context):
        """What handle_train does after training, with the site's vector as its update."""
        i = int(context.node_config["partition-id"])
        glob = adapters.read_adapter(msg.content)
        delta = {"w": np.load(paths[i]).astype(np.float32)}
        metrics = {"num-examples": weights[i], "train-loss": 0.0}
        if p.RECORD in msg.content:
            try:
                flat = secure.flatten_update(delta, glob)
                y, extra = secure.masked_input(context, msg.content[p.RECORD], flat, weights[i], seed=i)
            except SecAggError:
                return reply(msg, i, "refused", metrics)
            return reply(msg, i, "ok", {**metrics, **extra}, {p.MASKED: p.masked_record(y)})
        return reply(msg, i, "ok", metrics, adapters.adapter_records(adapters.to_tensors(delta)))

    def stage(msg, context):
        i = int(context.node_config["partition-id"])
        if (
            msg.metadata.message_type == p.ADVERTISE
        ):  # the site's example count is its given weight (no data file to count)
            ident = secure.Identity(load_identity(sites[i].key))
            return reply(
                msg, i, "ok", {}, {p.RECORD: secure.advertise(context, msg.content[p.RECORD], ident, weights[i])}
            )
        return client_app.handle_secure_stage(msg, context, sites)

    for kind in p.STAGES:
        app.train(kind.split(".", 1)[1])(stage)

    @app.evaluate()
    def evaluate(msg, context):  # the warm-up
        return reply(msg, int(context.node_config["partition-id"]), "ok", {"num-examples": 1})

    return app


def fedtune_round(
    vectors, weights, *, secure: bool, clip: float = 0.1, max_weight: int = 10_000, cpus_per_client: float = 1.0
):
    """One training round of ours over the vectors -> {aggregate (new global vector from zeros),
    seconds, upload (bytes per param), secure (the round's secure_aggregation record)}."""
    from collections import OrderedDict

    from flwr.serverapp import ServerApp

    from fedtune.common.config import FedTuneConfig
    from fedtune.server import app as server
    from fedtune.server.aggregation import ServerOptimizer

    cfg = FedTuneConfig.model_validate(
        {
            "federation": {
                "rounds": 1,
                "min_sites": 2,
                "round_timeout_s": 3600,
                "server_lr": 1.0,
            },  # the new global is the mean, compared with Flower's
            "secure_aggregation": {"enabled": secure, "clip": clip, "max_weight": max_weight},
        }
    )
    out: dict = {}

    def server_app_for(m: int, n: int) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:
            fs._warm_up(grid, m)
            with tempfile.TemporaryDirectory() as run_dir:
                rs = server.RunState(
                    cfg=cfg,
                    out=Path(run_dir),
                    global_state=OrderedDict(w=np.zeros(n, np.float32)),
                    peft_config=None,
                    trainable_params=n,
                    optimizer=ServerOptimizer.from_config(cfg.federation),
                )
                t0 = time.perf_counter()
                rec = server.run_training_round(grid, sorted(grid.get_node_ids()), rs, 1, lambda s: None)
                out["seconds"] = time.perf_counter() - t0
                out["aggregate"] = rs.global_state["w"].astype(np.float64)
                sites = [v for v in rec["sites"].values() if v.get("status") == "ok"]
                out["upload"] = max(v.get("bytes_sent", 0) for v in sites) / n
                out["secure"] = rec.get("secure_aggregation")

        return app

    fs.simulate(vectors, weights, server_app_for, _client_app, cpus_per_client)
    if "aggregate" not in out:
        raise RuntimeError("the round ended without an aggregate (see the messages above)")
    return out


def our_error_bound(weights, clip: float = 0.1, max_weight: int = 10_000, weight_cap: float | None = 3.0) -> float:
    """The stated bound of our secure round: the quantizer's range is the round's weight cap
    (max_weight, and weight_cap x the median count; federation.weight_cap's default is 3)."""
    from fedtune.common.secagg import Quantizer, round_weight_cap

    cap = round_weight_cap(weights, weight_cap, max_weight)
    q = Quantizer(clip, cap, len(weights))
    return q.mean_error_bound(sum(min(w, cap) for w in weights), len(weights)) + 1e-7  # + float32 storage of the result


def signature_costs(m: int, reps: int = 200) -> dict[str, float]:
    """What the signed keys and the consistency check add per round, in CPU milliseconds, from
    timing ECDSA P-384 signing and verification here: each site signs twice (its keys, the alive
    set) and verifies its m - 1 neighbours' keys and up to m signatures on the alive set; the
    coordinator verifies 2 m (it drops a bad one before it can abort the round)."""
    from fedtune.common.secagg import identity_public, new_identity, sign, verify

    key = new_identity()
    pub, msg = identity_public(key), b"x" * 200
    t0 = time.perf_counter()
    sigs = [sign(key, msg) for _ in range(reps)]
    t_sign = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    assert all(verify(pub, s_, msg) for s_ in sigs)
    t_verify = (time.perf_counter() - t0) / reps
    return {
        "sign_ms": 1e3 * t_sign,
        "verify_ms": 1e3 * t_verify,
        "site_ms_per_round": 1e3 * (2 * t_sign + (2 * m - 1) * t_verify),
        "coordinator_ms_per_round": 1e3 * 2 * m * t_verify,
    }


def ftsim_round_seconds(secure: bool, out: Path, rounds: int) -> list[float]:
    """The built-in demo (default model, 3 sites, 10 local steps) through ftsim, plain or
    secure: each round's training phase in seconds (run_training_round: training, and under
    secure aggregation every stage and the unmasking)."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "--rounds", str(rounds), "--no-plots", "--out", str(out)]
    # The general-knowledge scoring (eval.forgetting) happens outside the rounds timed here: skipped.
    cmd += ["--set", "eval.max_examples=8", "--set", "eval.exact_match=false", "--set", "eval.forgetting=false"] + (
        ["--secure-aggregation"] if secure else []
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ftsim failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    doc = json.loads((out / "metrics.json").read_text())
    return [float(r["train_seconds"]) for r in doc["rounds"][1:]]


UPLOAD_FIXED_BYTES = 16  # what an upload may carry beside 4 bytes a value: O(1) (ours: the 4-byte weight)


def verdict(key: str, value: float, params: int | None = None) -> str:
    op, goal = GOALS[key]
    if key == "upload_bytes_per_param" and params:  # 4 bytes a value, plus O(1) bytes a message
        ok = value * params <= goal * params + UPLOAD_FIXED_BYTES + 1e-6
        return f"goal <= {goal} a value + {UPLOAD_FIXED_BYTES} bytes an upload: {'MET' if ok else 'NOT MET'}"
    ok = value <= goal if op == "<=" else value < goal
    return f"goal {op} {goal}: {'MET' if ok else 'NOT MET'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 sites, 10k parameters, 1 repetition")
    ap.add_argument("--sites", type=int)
    ap.add_argument(
        "--params", type=int, action="append", help="parameter counts (repeatable; default 1000000 and 10000000)"
    )
    ap.add_argument("--reps", type=int)
    ap.add_argument(
        "--model-rounds",
        type=int,
        help="also run the built-in demo (default model, 3 sites) through ftsim plain and secure for this many rounds "
        "(full run: 2; quick: 0 = skip)",
    )
    args = ap.parse_args(argv)
    m = args.sites or (5 if args.quick else 10)
    sizes = args.params or ([10_000] if args.quick else [1_000_000, 10_000_000])
    reps = args.reps or (1 if args.quick else 3)
    rng = np.random.default_rng(0)
    weights = [int(w) for w in rng.integers(50, 500, m)]
    # Flower's quantization, as close to ours as it allows: every weight fits (W = the largest),
    # and the clip applies to (n_i / W) * x_i, so the same 0.1 covers the same updates.
    flower_kw = dict(max_weight=float(max(weights)), clipping_range=0.1, quantization_range=2**32 // (m + 1) - 1)
    figures: dict[str, float] = {}
    print(
        f"secure aggregation benchmark: {m} sites, weights {weights}, sizes {sizes}, {reps} repetition(s) each, interleaved"
    )
    try:
        for n in sizes:
            xs = [rng.normal(0, 1e-3, n) for _ in range(m)]
            want = fs.reference_mean(xs, weights)
            times: dict[str, list[float]] = {"plain": [], "secure": [], "flower": [], "consistency": []}
            for rep in range(reps):
                plain = fedtune_round(xs, weights, secure=False)
                ours = fedtune_round(xs, weights, secure=True)
                flower = fs.flower_secaggplus(xs, weights, **flower_kw)
                times["plain"].append(plain["seconds"])
                times["secure"].append(ours["seconds"])
                times["flower"].append(flower.seconds)
                times["consistency"].append(ours["secure"]["stage_seconds"]["consistency"])
                err_ours = float(np.abs(ours["aggregate"] - want).max())
                err_flower = float(np.abs(flower.aggregate - want).max())
                gap = float(np.abs(ours["aggregate"] - flower.aggregate).max())
                bound = our_error_bound(weights) + fs.aggregate_error_bound(
                    weights, max_abs=float(max(np.abs(x).max() for x in xs)), **flower_kw
                )
                print(
                    f"  {n:>10,} params rep {rep + 1}: plain {plain['seconds']:.2f} s | ours secure {ours['seconds']:.2f} s "
                    f"(stages {ours['secure']['stage_seconds']}) | Flower SecAgg+ {flower.seconds:.2f} s; "
                    f"max |error| ours {err_ours:.2e} (bound {our_error_bound(weights):.2e}), Flower {err_flower:.2e}; "
                    f"ours vs Flower {gap:.2e} (bound {bound:.2e})",
                    flush=True,
                )
                if gap > bound:
                    print(f"  MISMATCH: ours and Flower's aggregates differ by {gap:.3g} > {bound:.3g}")
                    return 1
            med = {k: statistics.median(v) for k, v in times.items()}
            figures[f"secure_over_plain_{n}"] = med["secure"] / med["plain"]
            figures[f"ours_over_flower_{n}"] = med["secure"] / med["flower"]
            figures["upload_bytes_per_param"] = ours["upload"]
            figures["upload_fixed_bytes"] = round(ours["upload"] * n - 4 * n)  # beside 4 bytes a value: the weight
            figures["flower_upload_bytes_per_param"] = flower.upload_bytes_per_param
            figures["secure_overhead_s"] = med["secure"] - med["plain"]
            figures["consistency_stage_s"] = statistics.median(times["consistency"])
            print(
                f"  {n:>10,} params: medians plain {med['plain']:.2f} s, ours {med['secure']:.2f} s, Flower {med['flower']:.2f} s; "
                f"upload ours {ours['upload']:.4f} B/param, Flower {flower.upload_bytes_per_param:.4f} B/param"
            )
    finally:
        fs.shutdown()
    model_rounds = args.model_rounds if args.model_rounds is not None else (0 if args.quick else 2)
    if model_rounds:
        with tempfile.TemporaryDirectory(prefix="secagg-ftsim-") as tmp:
            plain_s = ftsim_round_seconds(False, Path(tmp) / "plain", model_rounds)
            secure_s = ftsim_round_seconds(True, Path(tmp) / "secure", model_rounds)
        figures["secure_over_plain_with_training"] = statistics.median(secure_s) / statistics.median(plain_s)
        print(
            f"  ftsim demo (default model, 3 sites, 10 local steps), training phase per round: plain {plain_s} s, "
            f"secure {secure_s} s"
        )
    sig = signature_costs(m)
    figures.update({f"signature_{k}": v for k, v in sig.items()})
    print(
        f"  signatures (ECDSA P-384): sign {sig['sign_ms']:.2f} ms, verify {sig['verify_ms']:.2f} ms; per round "
        f"{sig['site_ms_per_round']:.1f} ms CPU at each site, {sig['coordinator_ms_per_round']:.1f} ms at the coordinator"
    )
    figures["secure_over_plain"] = max(
        v for k, v in figures.items() if k.startswith("secure_over_plain_") and k != "secure_over_plain_with_training"
    )
    figures["ours_over_flower"] = max(v for k, v in figures.items() if k.startswith("ours_over_flower_"))
    print(
        f"secure_over_plain = {figures['secure_over_plain']:.6f}  (the protocol against one plain exchange, no training: no goal)"
    )
    for key in GOALS:
        if key in figures:
            print(f"{key} = {figures[key]:.6f}  ({verdict(key, figures[key], sizes[-1])})")
        else:
            print(f"{key}: not measured (--model-rounds 0)")
    print(" ".join(f"{k}={v:.6g}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
