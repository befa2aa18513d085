"""server/report.py's plots as a person reads them: what each figure shows (drawn from a
hand-made record and inspected as matplotlib objects), and that report.html never shrinks one."""

from __future__ import annotations

import struct

import pytest

from fedtune.server import report
from fedtune.server.report import PLOT_DPI, PLOT_MAX_WIDTH_IN, human_bytes, render_markdown, write_report

pytest.importorskip("matplotlib").use("Agg")  # as write_plots draws
plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

LAYERS = [str(i) for i in range(-1, 5)]  # embeddings, layers 0-3, head/other


class Pyplot:
    """matplotlib.pyplot, keeping every figure a plot function makes (to look at after it closed it)."""

    def __init__(self):
        self.figures = []

    def subplots(self, *args, **kwargs):
        fig, axes = plt.subplots(*args, **kwargs)
        self.figures.append(fig)
        return fig, axes

    def __getattr__(self, name):
        return getattr(plt, name)


def draw(plot, doc, tmp_path):
    """The figure ``plot`` (a report._plot_* function) draws from ``doc``."""
    pyplot = Pyplot()
    plot(pyplot, tmp_path, report.as_record(doc))
    (fig,) = pyplot.figures
    FigureCanvasAgg(fig)  # closing it left a bare canvas: one with a renderer, to measure with
    return fig


def trained_round(r: int, sent: int, cosines: list[float], change: float) -> dict:
    """Round ``r``: every site sent ``sent`` bytes; per layer, the sites' cosines to the aggregate
    (site i: cosines[i:] and on) and the global change (``change`` times the layer's place)."""
    sites = {
        name: {
            "status": "ok",
            "examples": 120,
            "bytes_sent": sent,
            "cosine_to_aggregate": 0.6,
            "update_norm": 0.3,
            "by_layer": {
                k: {"update_norm": 0.1, "cosine_to_aggregate": cosines[(i + j) % len(cosines)]}
                for j, k in enumerate(LAYERS)
            },
        }
        for i, name in enumerate(("bank", "clinic", "legal"))
    }
    return {
        "round": r,
        "seconds": 60.0 + r,
        "sites": sites,
        "aggregate": {"eval_loss": 2.0, "exact_match": 0.3},
        "update_bytes": sent,
        "trainable_params": 4_870_000,
        "layer_change": {k: change * (j + 1) for j, k in enumerate(LAYERS)},
    }


def make_doc(sent=(19_500_000,) * 3, cosines=(0.44, 0.5, 0.62, 0.71, 0.8)) -> dict:
    """Three sites over three trained rounds, each round's change 10x smaller than the last's."""
    base = {n: {"eval_loss": 2.5, "exact_match": 0.1} for n in ("bank", "clinic", "legal")}
    rounds = [trained_round(r, b, list(cosines), 10.0**-r) for r, b in enumerate(sent, 1)]
    return {
        "fedtune": {"peft": "lora", "strategy": "fedavg", "update": "delta"},
        "model": "tiny",
        "trainable_params": 4_870_000,
        "n_layers": 4,
        "config": {},
        "elapsed_s": 200.0,
        "rounds": [
            {"round": 0, "seconds": 5.0, "sites": base, "aggregate": {"eval_loss": 2.5, "exact_match": 0.1}},
            *rounds,
        ],
        "forgetting": {
            "base": {"text_loss": 2.0, "qa_loss": 1.5, "qa_accuracy": 0.72},
            "final": {"text_loss": 2.05, "qa_loss": 1.55, "qa_accuracy": 0.69},
        },
    }


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_bytes_the_same_every_round_are_one_line_not_three_equal_bars(tmp_path):
    fig = draw(report._plot_rounds, make_doc(), tmp_path)
    assert fig.get_suptitle() == "upload: each site sent 19.5 MB every round"
    assert titles(fig) == ["time per round (train + evaluate)"]
    assert fig.get_size_inches()[0] <= PLOT_MAX_WIDTH_IN

    fig = draw(report._plot_rounds, make_doc(sent=(19_500_000, 21_000_000, 19_500_000)), tmp_path)
    assert fig.get_suptitle() == "" and titles(fig)[0] == "bytes one site sent per round"
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([19.5, 21.0, 19.5])


def test_the_bytes_line_says_only_what_the_record_shows():
    doc = report.as_record(make_doc())
    trained = doc.rounds[1:]
    assert report._bytes_note(trained) == "each site sent 19.5 MB every round"
    doc.rounds[2].sites["bank"].bytes_sent = None  # not drawn, or refused
    assert report._bytes_note(trained) == "each site sent 19.5 MB every round it trained"
    doc.rounds[2].sites["bank"].bytes_sent = 1_000_000  # update_bytes is the most one site sent
    assert report._bytes_note(trained) == "the most one site sent: 19.5 MB every round"
    for r in trained:
        r.update_bytes = None
    assert report._bytes_note(trained) == "bytes sent: not recorded"


def test_layers_are_scaled_per_round_so_a_small_late_round_is_not_one_dark_band(tmp_path):
    fig = draw(report._plot_layers, make_doc(), tmp_path)
    heat = fig.axes[0].images[0]
    grid = heat.get_array()
    # per round (column): the largest layer is 1, the others their share of it, whatever the scale
    assert [grid[:, j].max() for j in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    assert list(grid[:, 2]) == pytest.approx([(j + 1) / len(LAYERS) for j in range(len(LAYERS))])
    assert heat.get_clim() == (0, 1)
    assert fig.axes[1].get_ylabel() == "L2 norm of the change / the round's largest"
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["1\nmax 0.6", "2\nmax 0.06", "3\nmax 0.006"]  # the scale each round was divided by


def test_the_sites_colours_span_the_cosines_range_and_diverge_only_across_zero(tmp_path):
    fig = draw(report._plot_site_pulls, make_doc(), tmp_path)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert all(im.get_clim() == pytest.approx((0.44, 0.8)) for im in images)
    assert {im.get_cmap().name for im in images} == {"Blues"}
    assert fig.get_size_inches()[0] <= PLOT_MAX_WIDTH_IN

    fig = draw(report._plot_site_pulls, make_doc(cosines=(-0.2, 0.1, 0.5)), tmp_path)
    im = fig.axes[0].images[0]
    assert im.get_clim() == (-0.5, 0.5) and im.get_cmap().name == "RdBu"  # white at 0: across
    fig = draw(report._plot_site_pulls, make_doc(cosines=(-0.7, -0.3)), tmp_path)
    assert fig.axes[0].images[0].get_clim() == (-0.7, -0.3)
    assert fig.axes[0].images[0].get_cmap().name == "Reds_r"


def test_many_sites_wrap_into_rows_instead_of_one_wide_strip(tmp_path):
    doc = make_doc(sent=(19_500_000,) * 20)
    for r in doc["rounds"][1:]:
        for i in range(3, 8):
            r["sites"][f"site{i}"] = r["sites"]["bank"]
    fig = draw(report._plot_site_pulls, doc, tmp_path)
    assert fig.get_size_inches()[0] <= PLOT_MAX_WIDTH_IN
    assert sum(1 for ax in fig.axes if ax.images) == 8


def test_the_forgetting_legend_covers_no_bar(tmp_path):
    doc = make_doc()  # every bar about as tall as the panel: no corner inside it is free
    doc["forgetting"]["base"] |= {"text_loss": 2.4, "qa_loss": 2.45, "qa_accuracy": 0.6}
    doc["rounds"][0]["aggregate"]["exact_match"] = 0.65
    doc["rounds"][-1]["aggregate"] = {"eval_loss": 2.3, "exact_match": 0.7}
    fig = draw(report._plot_forgetting, doc, tmp_path)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.legend_ for ax in fig.axes if ax.legend_ is not None)]
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches]
    assert len(bars) == 10 and legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not [b for b in bars if b.overlaps(box)]
        assert not [
            ax for ax in fig.axes if ax.get_window_extent(renderer).overlaps(box)
        ]  # nor any axes: no data there
    assert [[t.get_text() for t in legend.get_texts()] for legend in legends] == [["base model", "after fine-tuning"]]


def png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_every_plot_fits_report_htmls_column_unshrunk(tmp_path):
    from fedtune.simulations.report_sections import baselines_section

    doc = make_doc(sent=tuple(19_500_000 + 10_000 * r for r in range(30)))  # 30 rounds, bytes vary
    score = {"eval_loss": 2.0, "exact_match": 0.5, "eval_examples": 4}
    doc["baselines"] = {
        "compute": "equal",
        "examples_per_step": 4,
        "steps": {"federation": {"total": 90}, "alone": {}, "pooled": 90},
        "sites": {
            n: {t: score for t in ("base", "alone", "pooled", "federation")} for n in ("bank", "clinic", "legal")
        },
        "mean": {t: {"eval_loss": 2.0, "exact_match": 0.5} for t in ("base", "alone", "pooled", "federation")},
    }
    write_report(tmp_path, doc, sections=[baselines_section()])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "baselines.png",
        "exact_match.png",
        "forgetting.png",
        "layers.png",
        "loss.png",
        "rounds.png",
        "sites.png",
    ]
    widest = round(PLOT_MAX_WIDTH_IN * PLOT_DPI)
    assert {p: png_width(tmp_path / p) for p in pngs} == {p: min(widest, png_width(tmp_path / p)) for p in pngs}
    html = (tmp_path / "report.html").read_text()
    assert widest <= 1100 - 2 * 16 and "max-width:1100px" in html and "img{max-width:100%;height:auto" in html


def test_human_bytes():
    assert [human_bytes(n) for n in (None, 0, 512, 16_384, 999_960, 19_500_000, 123_456_789, 2_500_000_000)] == [
        "–",
        "0 B",
        "512 B",
        "16.4 kB",
        "1.0 MB",
        "19.5 MB",
        "123 MB",
        "2.5 GB",
    ]


def test_both_tables_say_bytes_sent_alike_and_examples_are_train_examples():
    md = render_markdown(make_doc(), [])
    per_site = md.split("## Per site")[1].split("## Rounds")[0]
    rounds = md.split("## Rounds")[1].split("\n## ")[0]
    assert "| train examples | bytes sent / round |" in per_site and "| examples |" not in md
    assert "| bank | 2.500 | – | 0.10 | – | 120 | 19.5 MB |" in per_site
    assert "| 3 | bank | ok | – | – | – | – | – | 19.5 MB |" in rounds
    assert "19500000" not in md and "19,500,000" not in md
    assert "4,870,000 parameters, 19.5 MB per site" in md
