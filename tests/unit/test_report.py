"""server/report.py: report.md and the PNG plots from a hand-made metrics document."""

from __future__ import annotations

import json

import pytest

from fedtune.server.report import render_markdown, series, site_names, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_doc(with_em: bool = True) -> dict:
    def em(x):
        return x if with_em else None

    return {
        "fedtune": {"peft": "lora", "strategy": "fedavg", "update": "delta"},
        "model": "tiny-llama",
        "trainable_params": 4096,
        "config": {},
        "elapsed_s": 42.4,
        "rounds": [
            {
                "round": 0,
                "sites": {
                    "clinic": {"eval_loss": 2.5, "exact_match": em(0.25), "eval_examples": 4},
                    "bank": {"eval_loss": 3.0, "exact_match": em(0.0), "eval_examples": 4},
                },
                "aggregate": {"eval_loss": 2.75},
            },
            {
                "round": 1,
                "sites": {
                    "clinic": {
                        "status": "ok",
                        "train_loss": 2.25,
                        "eval_loss": 2.0,
                        "exact_match": em(0.5),
                        "examples": 10,
                        "steps": 2,
                        "train_seconds": 1.25,
                        "bytes_sent": 16384,
                    },
                    "bank": {
                        "status": "rejected",
                        "reason": "a: 2 non-finite value(s)",
                        "train_loss": float("nan"),
                        "eval_loss": 2.9,
                        "exact_match": em(0.0),
                        "examples": 8,
                        "steps": 2,
                        "train_seconds": 1.0,
                        "bytes_sent": 16384,
                    },
                },
                "rejected": [{"site": "bank", "reason": "a: 2 non-finite value(s)"}],
                "aggregate": {},
            },
            {
                "round": 2,
                "sites": {
                    "clinic": {
                        "status": "ok",
                        "train_loss": 1.75,
                        "eval_loss": 1.5,
                        "exact_match": em(0.75),
                        "examples": 10,
                        "steps": 2,
                        "train_seconds": 1.5,
                        "bytes_sent": 16384,
                    },
                    "bank": {
                        "status": "ok",
                        "train_loss": 2.5,
                        "eval_loss": 2.625,
                        "exact_match": em(0.25),
                        "examples": 8,
                        "steps": 2,
                        "train_seconds": 1.0,
                        "bytes_sent": 16384,
                    },
                },
                "rejected": [],
                "aggregate": {},
            },
        ],
    }


def test_helpers():
    doc = make_doc()
    assert site_names(doc) == ["bank", "clinic"]
    assert series(doc, "clinic", "eval_loss") == ([0, 1, 2], [2.5, 2.0, 1.5])
    assert series(doc, "bank", "train_loss") == ([2], [2.5])  # NaN and missing skipped


def test_write_report_with_plots(tmp_path):
    path = write_report(tmp_path, make_doc())
    assert path == tmp_path / "report.md"
    md = path.read_text(encoding="utf-8")
    assert (
        "| site | eval loss, base | eval loss, final | exact match, base | exact match, final | train examples | bytes sent / round |"
        in md
    )
    assert "| clinic | 2.500 | 1.500 | 0.25 | 0.75 | 10 | 16.4 kB |" in md
    assert "| bank | 3.000 | 2.625 | 0.00 | 0.25 | 8 | 16.4 kB |" in md
    assert "| 1 | bank | rejected | – | 2.900 | 0.00 | 2 | 1.0 | 16.4 kB |" in md
    assert "| 0 | clinic | ok | – | 2.500 | 0.25 | – | – | – |" in md
    assert "- round 1, bank: a: 2 non-finite value(s)" in md
    assert "sites: bank, clinic; rounds: 2; wall time: 42 s" in md
    assert "4,096 trainable parameters" in md
    for png in ("loss.png", "exact_match.png"):
        f = tmp_path / png
        assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 5000
        assert f"![{png}]({png})" in md
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_exact_match_plot_without_exact_match(tmp_path):
    md = write_report(tmp_path, make_doc(with_em=False)).read_text()
    assert (tmp_path / "loss.png").is_file()
    assert not (tmp_path / "exact_match.png").exists()
    assert "| clinic | 2.500 | 1.500 | – | – | 10 | 16.4 kB |" in md


def test_report_without_plots(tmp_path):
    md = write_report(tmp_path, make_doc(), plots=False).read_text()
    assert not list(tmp_path.glob("*.png"))
    assert "No plots" in md


def test_report_of_a_run_with_no_rounds():
    doc = make_doc()
    doc["rounds"] = []
    md = render_markdown(doc, [])
    assert "sites: none; rounds: 0" in md


@pytest.mark.parametrize("plots", [True, False])
def test_report_overwrites(tmp_path, plots):
    (tmp_path / "report.md").write_text("old")
    write_report(tmp_path, make_doc(), plots=plots)
    assert (tmp_path / "report.md").read_text().startswith("# fedtune run report")


def test_report_shows_secure_aggregation_rounds():
    doc = make_doc()
    doc["fedtune"]["secure_aggregation"] = True
    doc["rounds"][2]["secure_aggregation"] = {
        "threshold": 2,
        "sites_per_stage": [3, 3, 2, 2, 2],
        "dropped": {"key_sharing": ["lab"]},
        "quantization_error_bound": 3.2e-9,
        "clipped_values": 0,
        "upload_bytes_per_param": 4.0,
        "stage_seconds": {"train": 20.5, "share_keys": 0.4},
    }
    md = render_markdown(doc, [])
    assert "secure (SecAgg+)" in md and "## Secure aggregation (SecAgg+)" in md
    assert "| 2 | 2 of 3 | 2 | key_sharing: lab | 3.20e-09 | 0 | 4.00 | train 20.5, share_keys 0.4 |" in md
    assert "## Secure aggregation" not in render_markdown(make_doc(), [])


def test_report_names_the_artifact_and_each_rounds_update_size():
    doc = make_doc()
    doc["rounds"][1] |= {"trainable_params": 2048, "update_bytes": 8320}
    doc["rounds"][2] |= {"trainable_params": 4096, "update_bytes": 16512}
    md = render_markdown(doc, [])
    assert "round 1: 2,048 parameters, 8.3 kB per site; round 2: 4,096 parameters, 16.5 kB per site" in md
    assert "final adapter: `adapter/`" in md and "merged/" not in md
    doc["config"] = {"output": {"merged": True}}
    assert "merged into the base: `merged/`" in render_markdown(doc, [])
    doc["fedtune"] |= {"peft": "full", "artifact": "model"}
    md = render_markdown(doc, [])
    assert "final model: `model/`" in md and "adapter/" not in md


def test_contributed_sections_are_placed_and_show_their_own_plots(tmp_path):
    """Sections (what another program knows: ftsim's) go before or after the per-site table;
    their plots are drawn with the others and embedded by the section, not listed again."""
    from fedtune.server.report import ReportSection

    def draw(plt, out, record):
        fig, ax = plt.subplots()
        ax.plot([r.round for r in record.rounds])
        fig.savefig(out / "extra.png")
        plt.close(fig)
        return ["extra.png"]

    before = ReportSection(
        "before_per_site", lambda record, plots: ["", "## Before", "", f"{len(record.rounds)} rounds"]
    )
    after = ReportSection(
        "after_per_site",
        lambda record, plots: ["", "## After", *(["", "![extra.png](extra.png)"] if "extra.png" in plots else [])],
        draw,
        ("extra.png",),
    )
    md = write_report(tmp_path, make_doc(), sections=[before, after]).read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:4] == [
        "## Before",
        "## Per site: base model (round 0) against the final round",
        "## After",
        "## Rounds",
    ]
    assert "3 rounds" in md and md.count("![extra.png](extra.png)") == 1
    assert md.index("![extra.png]") < md.index("## Rounds")  # shown by its section, not under Plots
    assert (tmp_path / "extra.png").read_bytes()[:8] == PNG_MAGIC
    assert 'alt="extra.png"' in (tmp_path / "report.html").read_text()
    # Without the sections the report is the coordinator's alone.
    (tmp_path / "plain").mkdir()
    plain = write_report(tmp_path / "plain", make_doc(), plots=False).read_text()
    assert "## Before" not in plain and "## After" not in plain


def test_the_sites_data_section_is_ftsims_and_the_coordinators_report_reads_no_ftsim_file(tmp_path):
    """ftsim --partition's composition is rendered by simulations/, which passes it as a section;
    server/report.py no longer reads ftsim's partitions/composition.json."""
    import inspect

    from fedtune.server import report
    from fedtune.server.record import write_record
    from fedtune.simulations.report_sections import write_ftsim_report

    (tmp_path / "partitions").mkdir()
    composition = {
        "spec": "dirichlet:0.3",
        "seed": 7,
        "label_key": None,
        "data": [{"file": "a.jsonl", "domain": "a"}, {"file": "b.jsonl", "domain": "b"}],
        "records": 40,
        "sites": {
            "clinic": {"records": 25, "by_category": {"a": 20, "b": 5}},
            "bank": {"records": 15, "by_category": {"a": 0, "b": 15}},
        },
    }
    (tmp_path / "partitions" / "composition.json").write_text(json.dumps(composition))
    write_record(tmp_path / "metrics.json", make_doc())
    assert "## Sites' data" not in write_report(tmp_path, make_doc(), plots=False).read_text()
    assert "composition" not in inspect.getsource(report) and "partitions" not in inspect.getsource(report)
    md = write_ftsim_report(tmp_path, plots=False).read_text()
    assert (
        "One dataset of 40 records from 2 file(s), split by `dirichlet:0.3` (seed 7) over categories by domain (file)."
        in md
    )
    assert "| site | records | a | b |" in md and "| bank | 15 | 0 | 15 |" in md and "| clinic | 25 | 20 | 5 |" in md
    assert md.index("## Sites' data") < md.index("## Per site")
    assert md.index("- update size per round") < md.index("## Sites' data")
    # A record that cannot be read: said (with ``say``), and the coordinator's report stands.
    (tmp_path / "metrics.json").write_text("{")
    said: list[str] = []
    assert write_ftsim_report(tmp_path, plots=False, say=said.append) is None
    assert said and "metrics.json: the run record is not JSON" in said[0]
    # Nothing of ftsim's to add: the coordinator's report stands.
    write_record(tmp_path / "metrics.json", make_doc())
    (tmp_path / "partitions" / "composition.json").unlink()
    assert write_ftsim_report(tmp_path, plots=False) is None


def test_ftsim_renders_a_partitioned_runs_report_once_with_the_sites_data(tmp_path, monkeypatch):
    """ftsim's call site: ftsim hands its sections to the coordinator (make_server_app), whose
    end-of-run report of a partitioned run is rendered once, with the sites' data from
    simulations/; ftsim does not render it again. The engine is stubbed: the ServerApp is called
    as run_simulation calls it, and its federation only ends a run (the real finish_run) whose
    rounds are the hand-made record's."""
    from collections import OrderedDict

    import flwr.simulation

    from fedtune.common import modeling
    from fedtune.server import app as server
    from fedtune.server import report
    from fedtune.server.state import RunState
    from fedtune.simulations import cli as ftsim

    from .test_partition import finance_like

    data, _ = finance_like(tmp_path)
    out = tmp_path / "run"
    renders: list[list[str]] = []
    render = report.render_markdown

    def counting(doc, plots, sections=()):
        renders.append([section.where for section in sections])
        return render(doc, plots, sections)

    def federation(grid, cfg, out_dir, say, resume=False, site_keys=None, report_sections=(), **_):
        rs = RunState(cfg, out_dir, OrderedDict(), None, 4096)
        rs.rounds.extend(make_doc()["rounds"])
        server.finish_run(rs, say, report_sections)
        return rs

    def simulation(server_app, client_app, num_supernodes, backend_config):
        server_app(None, None)

    monkeypatch.setattr(report, "render_markdown", counting)
    monkeypatch.setattr(server, "run_federation", federation)
    monkeypatch.setattr(flwr.simulation, "run_simulation", simulation)
    monkeypatch.setattr(modeling, "resolve_model_source", lambda model: None)
    monkeypatch.setattr(ftsim, "prepare_engine", lambda: None)
    monkeypatch.setattr(ftsim, "start_ray", lambda: None)
    argv = ["--data", str(data), "--partition", "iid", "--sites", "2", "--out", str(out), "--no-plots"]
    assert ftsim.main([*argv, "--set", "eval.forgetting=false"]) == 0
    assert renders == [["before_per_site"]], "the report is rendered once, with ftsim's section"
    md = (out / "report.md").read_text()
    assert "## Sites' data" in md and "split by `iid`" in md and md.index("## Sites' data") < md.index("## Per site")


def full_doc() -> dict:
    """make_doc with every table's section: forgetting, per-layer change and pulls, mixed ranks,
    aggregation error and privacy, secure aggregation, and ftsim's baselines."""
    doc = make_doc()
    doc["config"] = {"privacy": {"clip": 0.5, "delta": 1e-5, "epsilon": 8.0}}
    doc["forgetting"] = {
        "base": {"text_loss": 2.0, "qa_loss": 1.5, "qa_accuracy": 0.5},
        "final": {"text_loss": 2.1, "qa_loss": 1.6, "qa_accuracy": 0.45},
    }
    r1 = doc["rounds"][1]
    r1.update(
        seconds=3.5,
        update_norm=0.25,
        aggregation_error=0.1,
        aggregation_error_rel=0.01,
        privacy={"epsilon": 1.25, "noise_multiplier": 1.1},
        layer_change={"0": 0.5, "1": 0.25},
        secure_aggregation={
            "threshold": 2,
            "sites_per_stage": [2, 2, 2, 2, 2, 2],
            "clipped_values": 0,
            "quantization_error_bound": 1e-6,
            "upload_bytes_per_param": 4.0,
        },
    )
    r1["sites"]["clinic"].update(rank=4, update_norm=0.3, cosine_to_aggregate=0.9)
    score = {"eval_loss": 2.0, "exact_match": 0.5, "eval_examples": 4}
    doc["baselines"] = {
        "compute": "equal",
        "examples_per_step": 4,
        "steps": {"federation": {"clinic": 2, "total": 2}, "alone": {"clinic": 2}, "pooled": 2},
        "sites": {"clinic": {t: score for t in ("base", "alone", "pooled", "federation")}},
        "mean": {t: {"eval_loss": 2.0, "exact_match": 0.5} for t in ("base", "alone", "pooled", "federation")},
    }
    return doc


def test_every_tables_head_is_rendered_as_it_always_was():
    """The heads of the report's tables (server/report.py's and ftsim's sections, all built by
    table_head) pinned byte for byte: blank line, title, blank line, intro, header row, separator."""
    from fedtune.simulations.report_sections import baselines_section, partition_section

    composition = {
        "spec": "iid",
        "seed": 1,
        "data": [{}],
        "records": 3,
        "sites": {"clinic": {"records": 3, "by_category": {"a": 2, "b": 1}}},
    }
    md = render_markdown(full_doc(), [], [partition_section(composition), baselines_section()])
    heads = [
        "\n\n## Sites' data\n\nOne dataset of 3 records from 1 file(s), split by `iid` (seed 1) over categories by "
        "domain (file).\n\n| site | records | a | b |\n| --- | --- | --- | --- |\n| clinic | 3 | 2 | 1 |\n",
        "\n\n## Per site: base model (round 0) against the final round\n\n| site | eval loss, base | eval loss, final | "
        "exact match, base | exact match, final | train examples | bytes sent / round |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        "\n\n| site: eval loss (lower is better) | base model | alone | pooled | federation | federation against alone | "
        "federation's gain, share of alone's | federation's gain, share of pooled's |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n| clinic |",
        "\n\n| site: exact match (higher is better) | base model | alone | pooled | federation | federation against alone | "
        "federation's gain, share of alone's | federation's gain, share of pooled's |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n| clinic |",
        "\n\n## Rounds\n\n| round | site | status | train loss | eval loss | exact match | steps | train s | bytes sent |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n| 0 |",
        "\n\n## Secure aggregation (SecAgg+)\n\nThe coordinator saw only masked vectors and, per round, the weighted mean "
        "of the sites summed.\n\n| round | sites summed | threshold | dropped | quantization error bound | values clipped | "
        "upload B/param | stage seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n| 1 |",
        "\n\n## What the model forgot\n\nThe domains (the sites' weighted evaluation, round 0 against the last round) "
        "next to fedtune's general-knowledge set (16 general paragraphs, 32 short general questions; answered = the "
        "expected answer appears in the greedy reply), scored by the coordinator on the base model and on the final "
        "adapter.\n\n| measure | base model | after fine-tuning | change |\n| --- | --- | --- | --- |\n| general text loss |",
        "\n\n## Aggregation and privacy\n\nAggregation error: how far the new global B·A is from the weighted mean of "
        "the sites' own B·A products, relative to how far that mean moved (0: exact, as FFA-LoRA is; plain LoRA averages "
        "A and B apart). Not measurable under secure aggregation, where the coordinator never sees a single site's "
        "update.\n\nClient-level differential privacy: each update clipped to L2 norm 0.5, Gaussian noise on the sum; "
        "(epsilon, delta) from an RDP accountant (dp-accounting), delta 1e-05, budget epsilon 8.0.\n\n| round | site "
        "ranks | update norm | aggregation error (rel.) | updates clipped | noise multiplier | epsilon spent |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n| 1 | clinic r=4 |",
        "\n\nEach site's update against the round's aggregate (cosine 1: along it; 0: across; below 0: against):\n\n"
        "| round | site | update norm | cosine to the aggregate |\n| --- | --- | --- | --- |\n| 1 | clinic |",
    ]
    for head in heads:
        assert head in md, head
    assert [md.index(head) for head in heads] == sorted(md.index(head) for head in heads)


def test_the_baselines_say_the_federations_gain_as_a_share_of_alones_and_pooleds():
    """Per site and on the mean: (base - federation) / (base - alone or pooled) for eval loss,
    the other way round for exact match; '–' where the other training gained nothing."""
    from fedtune.simulations.report_sections import baselines_section, gain_share

    assert gain_share({"base": 2.0, "alone": 1.0, "pooled": 0.5, "federation": 1.25}, "pooled", True) == 0.5
    assert gain_share({"base": 2.0, "alone": 1.0, "pooled": 0.5, "federation": 1.25}, "alone", True) == 0.75
    assert gain_share({"base": 0.1, "pooled": 0.9, "federation": 0.5}, "pooled", False) == 0.5
    assert gain_share({"base": 2.0, "pooled": 2.1, "federation": 1.0}, "pooled", True) is None  # pooled got worse
    assert gain_share({"base": 2.0, "pooled": None, "federation": 1.0}, "pooled", True) is None

    doc = full_doc()

    def at(loss, em):
        return {"eval_loss": loss, "exact_match": em, "eval_examples": 4}

    doc["baselines"]["sites"] = {
        "clinic": {"base": at(2.0, 0.0), "alone": at(1.0, 0.5), "pooled": at(0.5, 1.0), "federation": at(1.25, 0.75)},
        "bank": {"base": at(3.0, 0.0), "alone": at(2.0, 0.2), "pooled": at(1.0, 0.4), "federation": at(1.2, 0.4)},
    }
    doc["baselines"]["mean"] = {
        t: {"eval_loss": (a["eval_loss"] + b["eval_loss"]) / 2, "exact_match": (a["exact_match"] + b["exact_match"]) / 2}
        for t, a, b in ((t, doc["baselines"]["sites"]["clinic"][t], doc["baselines"]["sites"]["bank"][t]) for t in
                        ("base", "alone", "pooled", "federation"))
    }  # fmt: skip
    md = render_markdown(doc, [], [baselines_section()])
    assert "| clinic | 2.000 | 1.000 | 0.500 | 1.250 | +0.250 (worse) | 75% | 50% |" in md
    assert "| bank | 3.000 | 2.000 | 1.000 | 1.200 | -0.800 (better) | 180% | 90% |" in md
    assert "| clinic | 0.00 | 0.50 | 1.00 | 0.75 | +0.25 (better) | 150% | 75% |" in md
    assert "gain over the base model was 50% to 90% of pooled training's (lowest at clinic); 73% on the mean" in md
