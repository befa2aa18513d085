"""report.md, a self-contained report.html and PNG plots from a run's record (metrics.json,
read through :class:`fedtune.server.record.RunRecord`).

Plotting needs matplotlib (the ``plot`` extra); without it the report still lists the
numbers and says how to get the plots.

The report renders what the coordinator records. Parts that only another program knows about
(ftsim's split of one dataset into sites, its baselines) come in as sections (:class:`ReportSection`),
which that program builds (``fedtune.simulations.report_sections``) and passes to
:func:`write_report`: this module never reads another program's files.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from fedtune.common.checkpoint import atomic_write_bytes

from .messaging import clean
from .record import RoundRecord, RunRecord, SiteRound, validate_record

_MD_SPECIAL = re.compile(r"([\\`*\[\]|<>!])")


def md(text: object) -> str:
    """Text from the run's record (site names, statuses, reasons: written by sites) as markdown
    that says only itself: one line (messaging.clean), every character markdown could read as
    markup (links, images, tables, code, emphasis, HTML) backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", clean(text))


def fmt(x, spec=".3f") -> str:
    """A number for a table cell; a dash for a missing or non-finite one."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def human_bytes(n: int | None) -> str:
    """A byte count as people read it (decimal units: 19.5 MB, 16.4 kB, 512 B); a dash for none."""
    if n is None:
        return "–"
    for size, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        v = n / size
        if round(v, 1) >= 1:
            return f"{v:.1f} {unit}" if v < 99.95 else f"{v:.0f} {unit}"
    return f"{n:,} B"


def _get(m: BaseModel, key: str, default: object = "–") -> object:
    """``m.key`` when the record holds the key (even as null), else ``default``: a cell shows a
    dash for a figure that was never recorded."""
    return getattr(m, key) if key in m.model_fields_set else default


def _has(m: BaseModel, key: str) -> bool:
    """Whether the record holds ``key`` (a null value included)."""
    return key in m.model_fields_set


_NO_SITE = SiteRound()


def table_head(columns: Sequence[str], title: str | None = None, intro: Sequence[str] = ()) -> list[str]:
    """A table's first lines in the report: a blank line; the section's ``## title`` (if any) and a
    blank line; each ``intro`` paragraph and a blank line; the header row of ``columns`` and its
    separator. The table's rows follow."""
    lines = ["", *([f"## {title}", ""] if title else [])]
    for paragraph in intro:
        lines += [paragraph, ""]
    return [*lines, "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]


@dataclass(frozen=True)
class ReportSection:
    """A part of the report that is not the coordinator's to know: markdown lines placed before
    (``before_per_site``) or after (``after_per_site``) the per-site table, and optionally plots.

    ``lines(record, plots)``: the section's markdown lines (starting with a blank line), given the
    plot files made (so it embeds its own only if they exist). ``draw(plt, out, record)``: draws
    its plots into ``out`` with matplotlib's pyplot -> the file names written; ``files``: the names
    it may write, which it shows itself (they are not listed again under "Plots")."""

    where: Literal["before_per_site", "after_per_site"]
    lines: Callable[[RunRecord, Sequence[str]], list[str]]
    draw: Callable[[Any, Path, RunRecord], list[str]] | None = None
    files: tuple[str, ...] = ()


def as_record(doc: RunRecord | Mapping) -> RunRecord:
    """The run record, from a :class:`RunRecord` or a metrics document (validated)."""
    return validate_record(doc)


def site_names(doc: RunRecord | Mapping) -> list[str]:
    return as_record(doc).site_names()


def series(doc: RunRecord | Mapping, site: str, key: str) -> tuple[list[int], list[float]]:
    """Site ``site``'s figure ``key`` (a :class:`SiteRound` field) over the rounds that have it finite."""
    xs, ys = [], []
    for r in as_record(doc).rounds:
        v = getattr(r.sites.get(site, _NO_SITE), key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r.round)
            ys.append(float(v))
    return xs, ys


PLOT_DPI = 110
# The widest a plot gets: 1045 px at PLOT_DPI, inside report.html's column (1100 px less its
# padding), so the page shows every plot at its own size, never shrunk until its text is unreadable.
PLOT_MAX_WIDTH_IN = 9.5


def write_plots(out: Path, doc: RunRecord | Mapping, sections: Sequence[ReportSection] = ()) -> list[str]:
    """layers.png, sites.png, loss.png, exact_match.png, forgetting.png, rounds.png (those the
    record has figures for) and the sections' plots. -> the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    doc = as_record(doc)
    made = []
    contributed = [section.draw for section in sections if section.draw is not None]
    for draw in (
        _plot_layers,
        _plot_site_pulls,
        _plot_losses,
        _plot_exact_match,
        *contributed,
        _plot_forgetting,
        _plot_rounds,
    ):
        made += draw(plt, out, doc)
    return made


def _panel(ax, doc: RunRecord, key: str, title: str, xlabel: str, ylabel: str, personal: str | None = None) -> None:
    """One line per site of its figure ``key`` over the rounds (and, dashed in the same colour, its
    personalized model's figure ``personal`` where the run personalized)."""
    for name in doc.site_names():
        xs, ys = series(doc, name, key)
        if xs:
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            px, py = series(doc, name, personal) if personal else ([], [])
            if px:
                ax.plot(px, py, marker="s", ls="--", color=line.get_color(), label=f"{name}, personalized")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.xaxis.get_major_locator().set_params(integer=True)


def _round_ticks(ax, rounds: Sequence[int], labels: Sequence[str] | None = None, most: int = 10) -> None:
    """The x ticks of a heatmap over ``rounds`` (one column each): every round's, or every k-th
    round's when there are more than ``most`` (so their labels never run into each other)."""
    step = max(1, math.ceil(len(rounds) / most))
    shown = range(0, len(rounds), step)
    ax.set_xticks(list(shown), [(labels or [str(r) for r in rounds])[i] for i in shown])


def _per_round_share(grid: list[list[float]]) -> tuple[list[list[float]], list[float]]:
    """value[layer][round] divided by that round's largest value -> (the grid, each round's
    largest): every round spans the whole colour scale, however small its change was."""
    tops = [max(col) for col in zip(*grid)]
    return [[v / t if t > 0 else 0.0 for v, t in zip(row, tops)] for row in grid], tops


def _plot_layers(plt, out: Path, doc: RunRecord) -> list[str]:
    """layers.png: the norm of the global change per layer, relative to the round's largest
    (one colour scale per round: later rounds change less, and would all be one dark band)."""
    labels, rounds, grid = _layer_matrix(doc)
    if not labels:
        return []
    shares, tops = _per_round_share(grid)
    fig, ax = plt.subplots(
        figsize=(min(PLOT_MAX_WIDTH_IN, max(5, 0.8 * len(rounds) + 3.5)), max(3, 0.22 * len(labels) + 1.8)),
        constrained_layout=True,
    )
    im = ax.imshow(shares, aspect="auto", cmap="viridis", origin="lower", vmin=0, vmax=1)
    _round_ticks(ax, rounds, [f"{r}\nmax {t:.2g}" for r, t in zip(rounds, tops)], most=6)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("round (and its largest layer's L2 norm)")
    ax.set_ylabel("layer")
    ax.set_title("where adaptation happens: change per layer, within each round")
    fig.colorbar(im, ax=ax, label="L2 norm of the change / the round's largest")
    fig.savefig(out / "layers.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["layers.png"]


def _plot_losses(plt, out: Path, doc: RunRecord) -> list[str]:
    """loss.png: train and eval loss per site per round."""
    fig, axes = plt.subplots(1, 2, figsize=(PLOT_MAX_WIDTH_IN, 4), constrained_layout=True)
    _panel(axes[0], doc, "train_loss", "train loss (mean over local steps)", "round", "loss")
    _panel(
        axes[1], doc, "eval_loss", "eval loss (answer tokens)", "round (0 = base model)", "loss", "personal_eval_loss"
    )
    fig.savefig(out / "loss.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["loss.png"]


def _plot_exact_match(plt, out: Path, doc: RunRecord) -> list[str]:
    """exact_match.png, when some site reported exact match."""
    if not any(series(doc, n, "exact_match")[0] for n in doc.site_names()):
        return []
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    _panel(
        ax,
        doc,
        "exact_match",
        "exact match of the greedy answer, per site",
        "round (0 = base model)",
        "exact match",
        "personal_exact_match",
    )
    ax.set_ylim(-0.02, 1.02)
    fig.savefig(out / "exact_match.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["exact_match.png"]


def _plot_forgetting(plt, out: Path, doc: RunRecord) -> list[str]:
    """forgetting.png: the domains' gains against the general-knowledge set, base and final."""
    table = _forgetting_rows(doc)
    if not table:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(PLOT_MAX_WIDTH_IN, 4.2), constrained_layout=True)
    for ax, kind in zip(axes, ("loss", "score")):
        rows = [r for r in table if r[3] == kind]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="base model", color="tab:grey")
        ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="after fine-tuning", color="tab:green")
        ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
        ax.set_title("losses (lower is better)" if kind == "loss" else "scores (higher is better)")
        ax.grid(alpha=0.3, axis="y")
    # one legend for both panels, below them: inside an axes it covered a bar
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    fig.suptitle("domain gains against general knowledge (forgetting)")
    fig.savefig(out / "forgetting.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["forgetting.png"]


def _bytes_note(trained: Sequence[RoundRecord]) -> str | None:
    """One line for the bytes sent when a bar per round would say nothing (the same every
    round, or never recorded); None when they change between rounds (then they get bars)."""
    most = {r.update_bytes for r in trained}
    if most == {None}:
        return "bytes sent: not recorded"
    if len(most) > 1:
        return None
    (n,) = most
    sent = {s.bytes_sent for r in trained for s in r.sites.values()}  # None: a site that sent nothing
    if sent == {n}:
        return f"each site sent {human_bytes(n)} every round"
    if sent - {None} == {n}:
        return f"each site sent {human_bytes(n)} every round it trained"
    return f"the most one site sent: {human_bytes(n)} every round"


def _plot_rounds(plt, out: Path, doc: RunRecord) -> list[str]:
    """rounds.png: per trained round, the bytes one site sent (a line of text when they are the
    same every round), the time, and the privacy spent."""
    trained = [r for r in doc.rounds if r.round > 0 and r.seconds is not None]
    if not trained:
        return []
    eps = [(r.round, r.privacy.epsilon) for r in trained if r.privacy is not None]
    note = _bytes_note(trained)
    n = 1 + (note is None) + bool(eps)
    fig, axes = plt.subplots(
        1, n, figsize=(min(PLOT_MAX_WIDTH_IN, max(6, 4.75 * n)), 3.6), constrained_layout=True, squeeze=False
    )
    axes = list(axes[0])
    xs = [r.round for r in trained]
    if note is None:
        ax = axes.pop(0)
        ax.bar(xs, [(r.update_bytes or 0) / 1e6 for r in trained], color="tab:blue")
        ax.set_title("bytes one site sent per round")
        ax.set_ylabel("MB")
    else:
        fig.suptitle(f"upload: {note}")
    axes[0].bar(xs, [r.seconds for r in trained], color="tab:orange")
    axes[0].set_title("time per round (train + evaluate)")
    axes[0].set_ylabel("seconds")
    if eps:
        _privacy_panel(axes[1], eps, doc.setting("privacy", "epsilon"))
    for ax in fig.axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(out / "rounds.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["rounds.png"]


def _privacy_panel(ax, eps: Sequence[tuple[int, float]], budget: float | None) -> None:
    ax.plot([x for x, _ in eps], [e for _, e in eps], marker="o", color="tab:red", label="spent")
    if budget:
        ax.axhline(budget, linestyle="--", color="grey", label="budget")
    ax.set_title("privacy: cumulative epsilon")
    ax.legend()


def _forgetting_rows(doc: RunRecord) -> list[tuple[str, float, float, str]]:
    """(measure, base, final, 'loss'|'score'): the domains' federated eval next to the general set."""
    f = doc.forgetting
    rounds = doc.rounds
    if not (f is not None and f.base and f.final and rounds):
        return []
    base, final = f.base, f.final
    rows = []
    first, last = rounds[0].aggregate, rounds[-1].aggregate
    if first.eval_loss is not None and last.eval_loss is not None:
        rows.append(("domain eval loss", first.eval_loss, last.eval_loss, "loss"))
    rows += [
        ("general text loss", base.text_loss, final.text_loss, "loss"),
        ("general question loss", base.qa_loss, final.qa_loss, "loss"),
    ]
    if base.qa_wrong_loss is not None and final.qa_wrong_loss is not None:
        rows.append(("general question loss, a wrong answer", base.qa_wrong_loss, final.qa_wrong_loss, "loss"))
    if first.exact_match is not None and last.exact_match is not None:
        rows.append(("domain exact match", first.exact_match, last.exact_match, "score"))
    rows.append(("general questions answered", base.qa_accuracy, final.qa_accuracy, "score"))
    return rows


def _form_or_facts(doc: RunRecord) -> str | None:
    """Why the general question loss can fall while fewer questions are answered, in the run's
    figures: the loss of a wrong answer of the same form says whether the facts are still ranked
    above wrong ones (knowledge), the replies' length whether the way of answering changed (form)."""
    base, final = doc.forgetting.base, doc.forgetting.final
    if base.qa_wrong_loss is None or final.qa_wrong_loss is None:
        return None
    gap_b, gap_f = base.qa_wrong_loss - base.qa_loss, final.qa_wrong_loss - final.qa_loss
    said = (
        f"Right short answers' loss moved {final.qa_loss - base.qa_loss:+.3f}, a wrong answer's of the same form "
        f"(another question's) {final.qa_wrong_loss - base.qa_wrong_loss:+.3f}: the right answer's lead over a wrong "
        f"one went from {gap_b:.3f} to {gap_f:.3f} nats per answer token, so the model "
        + (
            "kept the facts"
            if gap_f >= 0.9 * gap_b
            else "kept part of the facts"
            if gap_f >= 0.5 * gap_b
            else "lost most of the facts"
        )
        + f". Questions answered went from {base.qa_accuracy:.2f} to {final.qa_accuracy:.2f}"
    )
    words = (base.qa_reply_words, final.qa_reply_words)
    if None not in words:
        said += f", with greedy replies of {words[0]:.1f} words on average before and {words[1]:.1f} after"
        if gap_f >= 0.9 * gap_b and final.qa_accuracy < base.qa_accuracy - 0.1:
            said += ": what fell is how it answers (in the form the sites' answers taught it), more than what it knows"
    return said + "."


def _forgetting_section(doc: RunRecord, plots: Sequence[str]) -> list[str]:
    rows = _forgetting_rows(doc)
    if not rows:
        return []
    out = table_head(
        ("measure", "base model", "after fine-tuning", "change"),
        "What the model forgot",
        [
            "The domains (the sites' weighted evaluation, round 0 against the last round) next to fedtune's general-knowledge "
            "set (16 general paragraphs, 32 short general questions; answered = the expected answer appears in the greedy "
            "reply), scored by the coordinator on the base model and on the final adapter."
        ],
    )
    out += [f"| {name} | {b:.3f} | {f:.3f} | {f - b:+.3f} |" for name, b, f, _ in rows]
    if (why := _form_or_facts(doc)) is not None:
        out += ["", why]
    if "forgetting.png" in plots:
        out += ["", "![forgetting.png](forgetting.png)"]
    return out


def _layer_label(label: str, n_layers: int | None) -> str:
    i = int(label)
    return "embeddings" if i < 0 else "head/other" if n_layers is not None and i >= n_layers else f"layer {i}"


def _layer_grid(
    doc: RunRecord, values_of: Callable[[RoundRecord], Mapping | None], missing: float
) -> tuple[list[str], list[int], list[list[float]]]:
    """-> (layer labels bottom-up, rounds, value[layer][round]) over the rounds for which
    ``values_of(round record)`` gives a {layer: value} mapping; ``missing`` where it has no value."""
    rounds = [(r.round, v) for r in doc.rounds if (v := values_of(r))]
    keys = sorted({k for _, v in rounds for k in v}, key=int)
    labels = [_layer_label(k, doc.n_layers or None) for k in keys]
    return (
        labels,
        [rnd for rnd, _ in rounds],
        [[missing if v.get(k) is None else v[k] for _, v in rounds] for k in keys],
    )


def _layer_matrix(doc: RunRecord) -> tuple[list[str], list[int], list[list[float]]]:
    """The norm of the global change per layer and round (each round's layer_change)."""
    return _layer_grid(doc, lambda r: r.layer_change, 0.0)


def _site_layer_cosines(doc: RunRecord) -> dict[str, tuple[list[str], list[int], list[list[float]]]]:
    """Per site: (layer labels bottom-up, rounds, cosine[layer][round]; NaN where unknown) from the
    rounds whose records hold the site's per-layer pull (``by_layer``)."""
    out = {}
    for name in doc.site_names():

        def cosines(r: RoundRecord, name=name) -> dict | None:
            by_layer = r.sites.get(name, _NO_SITE).by_layer
            return {k: v.cosine_to_aggregate for k, v in by_layer.items()} if by_layer else None

        labels, rounds, grid = _layer_grid(doc, cosines, math.nan)
        if rounds:
            out[name] = (labels, rounds, grid)
    return out


def _cosine_scale(grids: Sequence[list[list[float]]]) -> tuple[str, float, float]:
    """(colour map, vmin, vmax) fitted to the cosines' range: blues when every site pulled along
    the aggregate, reds when every one pulled against it, red-white-blue centred on 0 (white:
    across) when the values cross zero."""
    vals = [v for g in grids for row in g for v in row if math.isfinite(v)] or [0.0]
    lo, hi = min(vals), max(vals)
    if lo < 0 < hi:
        top = max(-lo, hi)
        return "RdBu", -top, top
    if hi - lo < 0.02:  # one value: a visible band around it
        lo, hi = lo - 0.01, hi + 0.01
    return ("Blues", lo, hi) if lo >= 0 else ("Reds_r", lo, hi)


def _panel_grid(n: int, panel_w: float) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels of ``panel_w`` inches within the widest a plot gets."""
    cols = max(1, min(n, int(PLOT_MAX_WIDTH_IN // panel_w)))
    return math.ceil(n / cols), cols


def _plot_site_pulls(plt, out: Path, doc: RunRecord) -> list[str]:
    """sites.png: which way each site pulled, per layer and round (its cosine to the aggregate),
    one panel per site, in rows when they do not fit side by side."""
    per_site = _site_layer_cosines(doc)
    if not per_site:
        return []
    n_labels = max(len(v[0]) for v in per_site.values())
    n_rounds = max(len(v[1]) for v in per_site.values())
    panel_w = min(PLOT_MAX_WIDTH_IN - 1, max(2.6, 0.45 * n_rounds + 1.2))
    rows, cols = _panel_grid(len(per_site), panel_w)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(min(PLOT_MAX_WIDTH_IN, panel_w * cols + 1.6), rows * max(2.4, 0.2 * n_labels + 1.1) + 0.4),
        constrained_layout=True,
        squeeze=False,
    )
    cmap, vmin, vmax = _cosine_scale([grid for _, _, grid in per_site.values()])
    flat = [ax for row in axes for ax in row]
    for i, (ax, (name, (labels, rounds, grid))) in enumerate(zip(flat, per_site.items())):
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
        _round_ticks(ax, rounds, most=max(2, int(panel_w * 1.6)))
        ax.set_yticks(range(len(labels)), labels if i % cols == 0 else [""] * len(labels))
        ax.set_xlabel("round")
        ax.set_title(name)
    for ax in flat[len(per_site) :]:
        ax.set_axis_off()
    fig.colorbar(im, ax=flat, label="cosine to the aggregate\n(1 along, 0 across, -1 against)")
    fig.suptitle("which way each site pulled, per layer")
    fig.savefig(out / "sites.png", dpi=PLOT_DPI)
    plt.close(fig)
    return ["sites.png"]


def _adaptation_section(doc: RunRecord, plots: Sequence[str]) -> list[str]:
    """Where adaptation happens (per layer) and which site pulls which way (per round)."""
    rounds = [r for r in doc.rounds if r.round > 0 and r.layer_change]
    if not rounds:
        return []
    out = ["", "## Where adaptation happens", ""]
    if "layers.png" in plots:
        out += ["![layers.png](layers.png)", ""]
    labels, _, grid = _layer_matrix(doc)
    top = sorted(zip(labels, (sum(row) for row in grid)), key=lambda t: -t[1])[:3]
    out.append("Largest total change: " + ", ".join(f"{lab} ({v:.3g})" for lab, v in top) + ".")
    pulls = [(r.round, n, s) for r in rounds for n, s in sorted(r.sites.items()) if _has(s, "cosine_to_aggregate")]
    if pulls:
        out += table_head(
            ("round", "site", "update norm", "cosine to the aggregate"),
            intro=[
                "Each site's update against the round's aggregate (cosine 1: along it; 0: across; below 0: against):"
            ],
        )
        out += [
            f"| {rnd} | {md(n)} | {fmt(s.update_norm, '.4g')} | {fmt(s.cosine_to_aggregate, '.3f')} |"
            for rnd, n, s in pulls
        ]
        if "sites.png" in plots:
            out += [
                "",
                "The same per layer (the colours span the cosines' range: blue where a site pulled along the "
                "aggregate, red where it pulled against it, white across it when some did each):",
                "",
                "![sites.png](sites.png)",
            ]
    elif doc.fedtune.secure_aggregation or doc.fedtune.differential_privacy:
        out += [
            "",
            "Per-site pulls are not shown: under secure aggregation or differential privacy only the aggregate is known or released.",
        ]
    return out


def _artifact_line(doc: RunRecord) -> str:
    if doc.fedtune.artifact == "model":
        return "- final model: `model/` (a Hugging Face model folder: `AutoModelForCausalLM.from_pretrained('model')`); per-round checkpoints in `checkpoints/`"
    merged = "; merged into the base: `merged/`" if doc.setting("output", "merged") else ""
    return f"- final adapter: `adapter/` (loads with `AutoPeftModelForCausalLM.from_pretrained('adapter')`){merged}; per-round checkpoints in `checkpoints/`"


def _best_lines(doc: RunRecord) -> list[str]:
    """The best round by the federated validation metric, and why the run stopped early."""
    out = []
    best = doc.best
    if best:
        where = (
            "; its adapter: `best/`"
            if doc.fedtune.artifact == "adapter"
            else f"; `checkpoints/round-{best.round:04d}/`"
        )
        base = " (the base model: no round improved on it)" if best.round == 0 else ""
        out.append(f"- best round: {best.round}{base}, federated {best.metric} {best.value:.4f}{where}")
    if doc.stopped:
        out.append(f"- **stopped early**: {doc.stopped}")
    return out


def _update_size_line(rounds: Sequence[RoundRecord]) -> str:
    """What trained and travelled per round (layer-wise control changes it between rounds)."""
    sizes = [(r.round, r.trainable_params, r.update_bytes) for r in rounds if _has(r, "trainable_params")]
    if not sizes:
        return "- update size per round: not recorded"
    parts = "; ".join(f"round {n}: {p:,} parameters, {human_bytes(b)} per site" for n, p, b in sizes)
    return f"- update size per round: {parts}"


def _aggregation_section(doc: RunRecord) -> list[str]:
    """Per round: the sites' LoRA ranks (mixed ranks), the aggregation error against the mean of
    the sites' B·A products, updates clipped to the norm bound, and the privacy spent."""
    rounds = [r for r in doc.rounds if r.round > 0]
    has = lambda key: any(_has(r, key) for r in rounds)  # noqa: E731
    ranked = any(_has(s, "rank") for r in rounds for s in r.sites.values())
    if not (has("aggregation_error") or has("privacy") or has("clipped_updates") or ranked):
        return []
    intro = []
    if has("aggregation_error"):
        intro.append(
            "Aggregation error: how far the new global B·A is from the weighted mean of the sites' own B·A products, "
            "relative to how far that mean moved (0: exact, as FFA-LoRA is; plain LoRA averages A and B apart). "
            "Not measurable under secure aggregation, where the coordinator never sees a single site's update."
        )
    if has("privacy"):
        intro.append(
            f"Client-level differential privacy: each update clipped to L2 norm {doc.setting('privacy', 'clip')}, Gaussian noise on the sum; "
            f"(epsilon, delta) from an RDP accountant (dp-accounting), delta {doc.setting('privacy', 'delta')}, budget epsilon {doc.setting('privacy', 'epsilon')}."
        )
    columns = (
        "round",
        "site ranks",
        "update norm",
        "aggregation error (rel.)",
        "updates clipped",
        "noise multiplier",
        "epsilon spent",
    )
    out = table_head(columns, "Aggregation and privacy", intro)
    for r in rounds:
        ranks = ", ".join(f"{md(n)} r={s.rank}" for n, s in sorted(r.sites.items()) if _has(s, "rank")) or "–"
        p = r.privacy
        err = f"{fmt(r.aggregation_error_rel, '.2e')}" if _has(r, "aggregation_error_rel") else "–"
        out.append(
            f"| {r.round} | {ranks} | {fmt(r.update_norm, '.4f')} | {err} | {_get(r, 'clipped_updates')} | "
            f"{fmt(p and p.noise_multiplier)} | {fmt(p and p.epsilon)} |"
        )
    return out


def render_markdown(doc: RunRecord | Mapping, plots: Sequence[str], sections: Sequence[ReportSection] = ()) -> str:
    """report.md's text: the record's figures; ``plots``: the plot files made (embedded by name);
    ``sections``: parts others contribute (:class:`ReportSection`), in order at their place."""
    doc = as_record(doc)

    def contributed(where: str) -> list[str]:
        return [line for section in sections if section.where == where for line in section.lines(doc, plots)]

    lines = [
        *_header_lines(doc),
        *contributed("before_per_site"),
        *_per_site_table(doc),
        *contributed("after_per_site"),
        *_rounds_table(doc),
        *_secure_section(doc),
        *_forgetting_section(doc, plots),
        *_aggregation_section(doc),
        *_adaptation_section(doc, plots),
        *_rejected_section(doc),
        *_plots_section(plots, sections),
    ]
    return "\n".join(lines) + "\n"


def _header_lines(doc: RunRecord) -> list[str]:
    """The title and what ran: model, method, aggregation, sites, rounds, artifact, best round."""
    last = doc.rounds[-1].round if doc.rounds else 0
    return [
        "# fedtune run report",
        "",
        f"- model: `{doc.model}`; method: {doc.fedtune.peft} ({doc.trainable_params:,} trainable parameters); "
        f"aggregation: {doc.fedtune.strategy} over {doc.fedtune.update}s"
        + (", secure (SecAgg+)" if doc.fedtune.secure_aggregation else "")
        + (", client-level differential privacy" if doc.fedtune.differential_privacy else ""),
        f"- sites: {', '.join(md(n) for n in doc.site_names()) or 'none'}; rounds: {last}; wall time: {doc.elapsed_s:.0f} s",
        _artifact_line(doc),
        *_best_lines(doc),
        _update_size_line(doc.rounds),
    ]


def _per_site_table(doc: RunRecord) -> list[str]:
    """Each site's evaluation on the base model (round 0) against the final round (and, when the
    run personalized, the final round's personalized model at each site)."""
    first = doc.rounds[0].sites if doc.rounds else {}
    final = doc.rounds[-1].sites if doc.rounds else {}
    personal = any(s.personal_eval_loss is not None for s in final.values())
    columns = (
        "site",
        "eval loss, base",
        "eval loss, final",
        *(("eval loss, personalized",) if personal else ()),
        "exact match, base",
        "exact match, final",
        *(("exact match, personalized",) if personal else ()),
        "train examples",
        "bytes sent / round",
    )
    lines = table_head(columns, "Per site: base model (round 0) against the final round")
    for n in doc.site_names():
        f0, f1 = first.get(n, _NO_SITE), final.get(n, _NO_SITE)
        p_loss = f" {fmt(f1.personal_eval_loss)} |" if personal else ""
        p_em = f" {fmt(f1.personal_exact_match, '.2f')} |" if personal else ""
        lines.append(
            f"| {md(n)} | {fmt(f0.eval_loss)} | {fmt(f1.eval_loss)} |{p_loss} {fmt(f0.exact_match, '.2f')} | "
            f"{fmt(f1.exact_match, '.2f')} |{p_em} {fmt(f1.examples, ',')} | {human_bytes(f1.bytes_sent)} |"
        )
    if personal:
        lines += [
            "",
            "Personalized: each site's own model (federation.personalization), scored by the site on the same "
            "examples; the coordinator received the scores only. In ftsim the models are under sites/NAME/personalized "
            "(in a deployment they stay at each site).",
        ]
    return lines


def _rounds_table(doc: RunRecord) -> list[str]:
    """Every site in every round: its status, losses, steps, time and upload."""
    columns = ("round", "site", "status", "train loss", "eval loss", "exact match", "steps", "train s", "bytes sent")
    lines = table_head(columns, "Rounds")
    names = doc.site_names()
    for r in doc.rounds:
        for n in names:
            s = r.sites.get(n)
            if s is None:
                continue
            status = s.status or (
                "eval " + s.eval_status if s.eval_status is not None else "ok" if r.round == 0 else "–"
            )
            lines.append(
                f"| {r.round} | {md(n)} | {md(status)} | {fmt(s.train_loss)} | "
                f"{fmt(s.eval_loss)} | {fmt(s.exact_match, '.2f')} | {_get(s, 'steps')} | "
                f"{fmt(s.train_seconds, '.1f')} | {human_bytes(s.bytes_sent)} |"
            )
    return lines


def _secure_section(doc: RunRecord) -> list[str]:
    """Secure aggregation per round: the sites at each stage, the threshold, the quantization."""
    secure = [(r.round, r.secure_aggregation) for r in doc.rounds if r.secure_aggregation is not None]
    if not secure:
        return []
    columns = (
        "round",
        "sites summed",
        "threshold",
        "dropped",
        "quantization error bound",
        "values clipped",
        "upload B/param",
        "stage seconds",
    )
    lines = table_head(
        columns,
        "Secure aggregation (SecAgg+)",
        ["The coordinator saw only masked vectors and, per round, the weighted mean of the sites summed."],
    )
    for rnd, st in secure:
        dropped = (
            "; ".join(f"{md(stage)}: {', '.join(md(x) for x in names_)}" for stage, names_ in st.dropped.items())
            or "none"
        )
        stages = ", ".join(f"{k} {v:.1f}" for k, v in st.stage_seconds.items())
        lines.append(
            f"| {rnd} | {st.sites_per_stage[3]} of {st.sites_per_stage[0]} | {st.threshold} | {dropped} | "
            f"{st.quantization_error_bound:.2e} | {st.clipped_values:,} | {st.upload_bytes_per_param:.2f} | {stages} |"
        )
    return lines


def _rejected_section(doc: RunRecord) -> list[str]:
    rejected = [(r.round, x) for r in doc.rounds for x in r.rejected]
    if not rejected:
        return []
    return ["", "## Rejected updates", "", *(f"- round {rnd}, {md(x.site)}: {md(x.reason)}" for rnd, x in rejected)]


def _plots_section(plots: Sequence[str], sections: Sequence[ReportSection]) -> list[str]:
    """The plots no section shows where it belongs."""
    if not plots:
        return [
            "",
            "## Plots",
            "",
            "No plots: install the plot extra (`pip install 'fedtune[plot]'`) to get loss.png and exact_match.png.",
        ]
    shown = {"layers.png", "sites.png", "forgetting.png", *(f for section in sections for f in section.files)}
    return ["", "## Plots", "", *(f"![{p}]({p})" for p in plots if p not in shown)]


_INLINE = [
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
]
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%;height:auto;margin:0.5em 0}code{background:#f3f3f3;padding:0 3px}"
)


_ESCAPED = re.compile(r"\\([\\`*\[\]|<>!])")  # what md escapes


def _inline(text: str) -> str:
    """One line of the report's markdown as HTML: escaped, then **bold** and `code`; a
    backslash-escaped character (:func:`md`) stays that literal character."""
    literal: list[str] = []

    def hold(m: re.Match) -> str:
        literal.append(m.group(1))
        return f"\x00{len(literal) - 1}\x00"  # clean() leaves no NUL in the text: a safe marker

    text = html.escape(_ESCAPED.sub(hold, text), quote=False)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return re.sub(r"\x00(\d+)\x00", lambda m: html.escape(literal[int(m.group(1))]), text)


_CELL = re.compile(r"(?<!\\)\|")  # a table column: an unescaped |


def render_html(markdown: str, out: Path, images: list[str] | tuple[str, ...] = ()) -> str:
    """report.md as one self-contained HTML page: the same text and tables, every plot embedded
    as a data: URI (the page can be mailed or archived on its own).

    Only ``images`` are embedded: the plots :func:`write_plots` wrote, by file name, found
    inside ``out``. Any other image line (however it got into the text) stays text: the page
    never reads a file that a string in the run's record names."""
    allowed = set()
    root = out.resolve()
    for name in images:
        path = (out / name).resolve()
        if Path(name).name == name and path.parent == root and path.is_file():
            allowed.add(name)
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                row = lines[i].strip()
                row = row[1:] if row.startswith("|") else row
                row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
                cells = [c.strip() for c in _CELL.split(row)]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("</table>")
            continue
        if line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
            continue
        m = _IMAGE.match(line.strip())
        if m and m.group(2) in allowed:
            data = base64.b64encode((out / m.group(2)).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>fedtune run report</title>'
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    out: Path, doc: RunRecord | Mapping, plots: bool = True, sections: Sequence[ReportSection] = ()
) -> Path:
    """report.md, report.html and (``plots``) the PNG plots in ``out`` from the run's record (a
    :class:`RunRecord` or the metrics document), with the ``sections`` others contribute."""
    doc = as_record(doc)
    made = write_plots(out, doc, sections) if plots else []
    path = out / "report.md"
    markdown = render_markdown(doc, made, sections)
    atomic_write_bytes(path, markdown.encode("utf-8"))
    atomic_write_bytes(out / "report.html", render_html(markdown, out, made).encode("utf-8"))
    return path
