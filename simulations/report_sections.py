"""ftsim's parts of the run report: how one dataset was split into the sites (``ftsim --partition``)
and the baselines (``ftsim --baselines``).

The coordinator's report (:mod:`fedtune.server.report`) knows neither: they are ftsim's, so ftsim
builds them here as sections (:class:`~fedtune.server.report.ReportSection`) and passes them to
:func:`~fedtune.server.report.write_report`. ``ftsim`` hands :func:`federation_sections` to the
coordinator (``make_server_app(report_sections=...)``), whose end-of-run report is then rendered
once, with them; :func:`write_ftsim_report` rewrites a finished run's report with them, which
``ftsim --baselines`` does after the baselines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedtune.server.record import FILE, RecordError, RunRecord, read_record
from fedtune.server.report import PLOT_DPI, PLOT_MAX_WIDTH_IN, ReportSection, fmt, md, table_head, write_report

from .baselines import (
    PERSONALIZED,
    TRAININGS,
    BaselinesRecord,
    MeanScores,
    TrainingScores,
    is_personalized,
    on_all_mean,
    on_all_verdict,
    personal_verdict,
    trainings_of,
)
from .partition import COMPOSITION_FILE, PARTITIONS_DIR

# The trainings in the table and the plot: (key, label, colour).
BASELINES = (
    ("base", "base model", "tab:grey"),
    ("alone", "each site alone", "tab:orange"),
    ("pooled", "all data pooled", "tab:purple"),
    ("federation", "federation", "tab:green"),
    (PERSONALIZED, "personalized (each site's own model)", "tab:blue"),  # a personalized run's
)
assert tuple(t for t, _, _ in BASELINES[: len(TRAININGS)]) == TRAININGS


def _shown(b: BaselinesRecord) -> tuple[tuple[str, str, str], ...]:
    """The trainings of BASELINES this record scores (personalized only in a personalized run)."""
    keep = trainings_of(b)
    return tuple(row for row in BASELINES if row[0] in keep)


BASELINES_PLOT = "baselines.png"


# ------------------------------------------------------------------------------------ sites' data


def partition_section(composition: dict) -> ReportSection:
    """ftsim --partition: how the one dataset was split into the sites (counts only), placed
    before the per-site table. ``composition``: partition.py's composition.json."""

    def lines(_record: RunRecord, _plots: Sequence[str]) -> list[str]:
        sites = composition.get("sites", {})
        cats = sorted({c for s in sites.values() for c in s.get("by_category", {})})
        by = f"the field `{composition['label_key']}`" if composition.get("label_key") else "domain (file)"
        out = table_head(
            ("site", "records", *cats),
            "Sites' data",
            [
                f"One dataset of {composition.get('records', '?')} records from {len(composition.get('data', []))} file(s), split by "
                f"`{composition.get('spec')}` (seed {composition.get('seed')}) over categories by {by}."
            ],
        )
        for name, s in sorted(sites.items()):
            out.append(
                f"| {md(name)} | {s.get('records')} | "
                + " | ".join(str(s.get("by_category", {}).get(c, 0)) for c in cats)
                + " |"
            )
        return out

    return ReportSection("before_per_site", lines)


def read_composition(out: Path) -> dict | None:
    """The composition ftsim --partition wrote beside the run in ``out``, if any."""
    try:
        doc = json.loads((out / PARTITIONS_DIR / COMPOSITION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc else None


# -------------------------------------------------------------------------------------- baselines


def _value(row: TrainingScores | MeanScores, training: str, key: str) -> float | None:
    s = getattr(row, training)
    return None if s is None else getattr(s, key)


def _metrics(b: BaselinesRecord) -> list[str]:
    """The metrics some site has a baseline score for."""
    return [
        k
        for k in ("eval_loss", "exact_match")
        if any(_value(s, t, k) is not None for s in b.sites.values() for t, _, _ in BASELINES)
    ]


def _rows(b: BaselinesRecord) -> list[tuple[str, TrainingScores | MeanScores]]:
    """(group, scores) for every site and the example-weighted mean."""
    return [*b.sites.items(), ("mean", b.mean)]


def _draw_baselines(plt, out: Path, record: RunRecord) -> list[str]:
    """baselines.png: every site's score (and the mean) under each training, the metrics side by side
    (one under the other where side by side would be wider than a plot gets)."""
    b = BaselinesRecord.of(record)
    keys = _metrics(b) if b is not None else []
    if not keys:
        return []
    rows = _rows(b)
    groups = [g for g, _ in rows]
    panel_w = max(6, 1.8 * len(groups) + 2)
    side_by_side = panel_w * len(keys) <= PLOT_MAX_WIDTH_IN  # else one under the other: report.html shows it unshrunk
    n_rows, n_cols = (1, len(keys)) if side_by_side else (len(keys), 1)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(min(PLOT_MAX_WIDTH_IN, panel_w * n_cols), 4.4 * n_rows),
        constrained_layout=True,
        squeeze=False,
    )
    axes = [ax for row in axes for ax in row]
    shown = _shown(b)
    width = 0.8 / len(shown)
    for ax, key in zip(axes, keys):
        for j, (t, label, color) in enumerate(shown):
            vals = [_value(row, t, key) for _, row in rows]
            xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=label, color=color)
            ax.bar_label(bars, [fmt(v, ".2f") for v in vals], fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title("eval loss (lower is better)" if key == "eval_loss" else "exact match (higher is better)")
        if key == "exact_match":
            ax.set_ylim(0, 1.08)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(shown), fontsize=9)
    fig.suptitle("does federation help? each site's validation score at equal compute")
    fig.savefig(out / BASELINES_PLOT, dpi=PLOT_DPI)
    plt.close(fig)
    return [BASELINES_PLOT]


def gain_share(v: Mapping[str, float | None], other: str, lower_is_better: bool) -> float | None:
    """The federation's gain over the base model as a share of ``other``'s (``alone``, ``pooled``):
    1.0 is as far as it got, above 1 further. None when a score is missing or ``other`` did not
    gain (a share of nothing says nothing)."""
    base, fed, ref = v.get("base"), v.get("federation"), v.get(other)
    if base is None or fed is None or ref is None:
        return None
    sign = -1.0 if lower_is_better else 1.0
    reached = sign * (ref - base)
    return None if reached <= 1e-12 else sign * (fed - base) / reached


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _baselines_lines(record: RunRecord, plots: Sequence[str]) -> list[str]:
    b = BaselinesRecord.of(record)
    if b is None:
        return []
    out = [
        "",
        "## Does federation help? Baselines at equal compute",
        "",
        "Every site's validation score under four trainings with the same seed and compute: the base model; the site "
        "alone, on its own data, running the optimizer steps it ran in the federation; all sites' data pooled in one "
        "place, running their sum; and the federation. Alone and pooled train without the federation's clipping or noise.",
        "",
        _steps_line(b),
        *_summary_lines(b),
    ]
    for key in _metrics(b):
        out += _scores_table(b, key)
    out += _on_all_table(b)
    if BASELINES_PLOT in plots:
        out += ["", f"![{BASELINES_PLOT}]({BASELINES_PLOT})"]
    return out


def _steps_line(b: BaselinesRecord) -> str:
    steps = b.steps
    fed = ", ".join(f"{md(n)} {v}" for n, v in steps.federation.items() if n != "total")
    alone = ", ".join(f"{md(n)} {v}" for n, v in steps.alone.items())
    return (
        f"- optimizer steps of {b.examples_per_step} examples: federation {steps.federation['total']} ({fed}); "
        f"alone {alone}; pooled {steps.pooled}"
        + (
            f" (budget {steps.budget} each: local early stopping ended some rounds sooner)"
            if steps.budget not in (None, steps.federation["total"])
            else ""
        )
        + (
            "; each site's private steps (personalization) are counted in its compute, so alone and pooled have them too"
            if is_personalized(b)
            else ""
        )
    )


def _against(d: float, lower_is_better: bool, spec: str) -> str:
    """A difference to the site alone, with its word."""
    better = d < 0 if lower_is_better else d > 0
    return f"{d:+{spec}} ({'better' if better else 'worse' if d else 'same'})"


def _summary_lines(b: BaselinesRecord) -> list[str]:
    """In eval loss: at how many sites the federation beat the site alone (and pooled was best),
    the range of the federation's gain as a share of pooled training's, and (a personalized run)
    at how many the personalized model beat the site alone."""
    out = []
    scored = {n: {t: _value(row, t, "eval_loss") for t in TRAININGS} for n, row in b.sites.items()}
    both = [v for v in scored.values() if v["alone"] is not None and v["federation"] is not None]
    if both:
        full = [v for v in scored.values() if all(x is not None for x in v.values())]
        out.append(
            f"- eval loss: the federation did better than the site alone at {sum(v['federation'] < v['alone'] for v in both)} of {len(both)} site(s)"
            + (
                f"; all data pooled did best of the four at {sum(min(v, key=v.get) == 'pooled' for v in full)} of {len(full)}"
                if full
                else ""
            )
        )
    shares = {n: gain_share(v, "pooled", True) for n, v in scored.items()}
    shares = {n: x for n, x in shares.items() if x is not None}
    if shares:
        low = min(shares, key=shares.get)
        mean = gain_share({t: _value(b.mean, t, "eval_loss") for t in TRAININGS}, "pooled", True)
        out.append(
            f"- eval loss: the federation's gain over the base model was {_share(shares[low])} to "
            f"{_share(max(shares.values()))} of pooled training's (lowest at {md(low)})"
            + (f"; {_share(mean)} on the mean over sites" if mean is not None else "")
        )
    personal = personal_verdict(b)
    out += [f"- {personal}"] if personal else []
    return out


def _scores_table(b: BaselinesRecord, key: str) -> list[str]:
    """One metric's table: each site's (and the mean's) score under every training, the federation
    (and, a personalized run, the personalized model) against alone, and the federation's gain as a
    share of alone's and pooled's."""
    loss = key == "eval_loss"
    spec = ".3f" if loss else ".2f"
    measure = "eval loss (lower is better)" if loss else "exact match (higher is better)"
    shown = [t for t, _, _ in _shown(b)]
    personal = PERSONALIZED in shown
    out = table_head(
        (
            f"site: {measure}",
            "base model",
            "alone",
            "pooled",
            "federation",
            *(("personalized",) if personal else ()),
            "federation against alone",
            *(("personalized against alone",) if personal else ()),
            "federation's gain, share of alone's",
            "federation's gain, share of pooled's",
        )
    )
    for name, row in [*((md(n), r) for n, r in b.sites.items()), ("**mean**", b.mean)]:
        v = {t: _value(row, t, key) for t in shown}
        against = [
            _against(v[t] - v["alone"], loss, spec) if v["alone"] is not None and v[t] is not None else "–"
            for t in ("federation", *((PERSONALIZED,) if personal else ()))
        ]
        shares = " | ".join(_share(gain_share(v, other, loss)) for other in ("alone", "pooled"))
        out.append(
            f"| {name} | " + " | ".join(fmt(v[t], spec) for t in shown) + f" | {' | '.join(against)} | {shares} |"
        )
    return out


def _on_all_table(b: BaselinesRecord) -> list[str]:
    """Each site's alone model scored on every site's split, beside the federation's global model:
    is the federation better for everyone than the best model any one site trains for itself?"""
    if not b.alone_on_all:
        return []
    names = list(b.sites)
    rows = [(f"{md(t)} alone", by_site) for t, by_site in b.alone_on_all.items()]
    rows.append(("**federation**", {n: row.federation for n, row in b.sites.items()}))
    out = ["", "Each site's alone model on every site's split (eval loss; mean: example-weighted over the sites):"]
    out += table_head(("model", *(md(n) for n in names), "mean"))
    for label, by_site in rows:
        cells = [fmt(s.eval_loss if (s := by_site.get(n)) else None, ".3f") for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(on_all_mean(by_site), '.3f')} |")
    verdict = on_all_verdict(b, md)
    return out + ([f"- {verdict}"] if verdict else [])


def baselines_section() -> ReportSection:
    """ftsim --baselines: each site's score under the base model, alone, pooled and federated (the
    record's ``baselines``), with baselines.png, placed after the per-site table."""
    return ReportSection("after_per_site", _baselines_lines, _draw_baselines, (BASELINES_PLOT,))


# ---------------------------------------------------------------------------------------- the run


def sections_for(composition: dict | None, record: RunRecord) -> list[ReportSection]:
    """ftsim's sections for a run: the sites' data when it was partitioned, the baselines when it has them."""
    return [
        *([partition_section(composition)] if composition else []),
        *([baselines_section()] if record.baselines else []),
    ]


def federation_sections(out: Path) -> list[ReportSection]:
    """ftsim's sections for the coordinator's end-of-run report of the run in ``out``: the sites'
    data when it was partitioned (its composition is written before the federation starts). The
    coordinator's record has no baselines (they come after it, and add theirs)."""
    composition = read_composition(out)
    return [partition_section(composition)] if composition else []


def write_ftsim_report(
    out: Path, plots: bool = True, record: RunRecord | None = None, say: Callable[[str], None] | None = None
) -> Path | None:
    """Rewrite the report of the run in ``out`` (its metrics.json, or ``record``) with ftsim's
    sections. -> report.md's path; None when ftsim has nothing to add (the coordinator's report
    stands). With ``say``, a record that cannot be read is said there (the coordinator's report
    stands) instead of raised (:class:`~fedtune.server.record.RecordError`)."""
    if record is None:
        try:
            record = read_record(out / FILE)
        except RecordError as e:
            if say is None:
                raise
            say(f"report: ftsim's sections are not added: {e}")
            return None
    sections = sections_for(read_composition(out), record)
    if not sections:
        return None
    return write_report(out, record, plots=plots, sections=sections)
