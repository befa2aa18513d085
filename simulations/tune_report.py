"""A study's report (``ftsim tune``): report.md and a self-contained report.html, with Optuna's
own plots as PNGs (its matplotlib backend): the optimisation history, the parameters'
importances (fANOVA), a slice per parameter and every trial's rounds (the values the pruner saw)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from fedtune.common.checkpoint import atomic_write_bytes
from fedtune.server.report import PLOT_DPI, fmt, md, render_html, table_head

if TYPE_CHECKING:
    from .tune import Study

REPORT_MD, REPORT_HTML = "report.md", "report.html"


def write_study_report(runner: Study) -> list[str]:
    """report.md, report.html and the plots in the study's folder -> the plots' file names."""
    plots, skipped = _plots(runner) if runner.cfg.output.plots else ([], {})
    text = render_study(runner, plots, skipped)
    atomic_write_bytes(runner.out / REPORT_MD, text.encode("utf-8"))
    atomic_write_bytes(runner.out / REPORT_HTML, render_html(text, runner.out, plots).encode("utf-8"))
    return plots


def _compute(runner: Study, trials) -> tuple[int, int]:
    """(optimizer steps the finished trials ran, the steps had each run all its rounds)."""
    from .tune import ROUNDS, ROUNDS_RUN, STEPS

    ran = full = 0
    for t in trials:
        a = t.user_attrs
        per = a.get(STEPS) or 1
        ran += int(a.get(ROUNDS_RUN) or 0) * per
        full += int(a.get(ROUNDS) or 0) * per
    return ran, full


def render_study(runner: Study, plots: list[str], skipped: dict[str, str]) -> str:
    from .tune import (
        BEST_FILE,
        INVALID,
        RESUMES,
        ROUNDS,
        ROUNDS_RUN,
        SECONDS,
        TABLE_FILE,
        describe,
        shown_params,
        shown_url,
        storage_url,
    )

    cfg, study = runner.cfg, runner.study
    tc = cfg.tune
    st = runner.optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state == s] for s in (st.COMPLETE, st.PRUNED, st.FAIL, st.RUNNING, st.WAITING)}
    finished = by[st.COMPLETE] + by[st.PRUNED]
    best = runner._best()
    lines = [
        f"# fedtune study: {md(tc.study)}",
        "",
        f"- objective: {tc.metric} ({tc.direction}), the federated validation metric after a trial's last round "
        "(the sites' example-weighted mean)",
        f"- trials: {len(finished)} of {tc.trials} finished ({len(by[st.COMPLETE])} completed, {len(by[st.PRUNED])} pruned); "
        f"{len(by[st.FAIL])} failed or interrupted (an interrupted one goes on from its checkpoint under another number)"
        + (f"; {len(by[st.RUNNING])} running" if by[st.RUNNING] else ""),
        f"- sampler {tc.sampler} (seed {tc.seed}, {tc.startup} startup trials), pruner {tc.pruner}; storage "
        f"{md(shown_url(storage_url(cfg, runner.out)))}",
        f"- each trial: {len(cfg.federation.sites)} sites ({md(', '.join(s.name for s in cfg.federation.sites))}), "
        f"{cfg.federation.rounds} rounds unless searched, {md(cfg.peft.describe())}, {cfg.federation.strategy}"
        + (" with secure aggregation" if cfg.secure_aggregation.enabled else "")
        + (f", DP epsilon {cfg.privacy.epsilon:g}" if cfg.privacy.enabled else ""),
        "- search space: " + "; ".join(f"`{k}` {describe(p)}" for k, p in tc.space.items()),
    ]
    if best is not None:
        lines.append(
            f"- **best: trial {best.number}, {tc.metric} {best.value:.4f}** ({md(shown_params(best.params))}); "
            f"its config: `{BEST_FILE}` (`ftsim --config {BEST_FILE}`, `ftserver --config {BEST_FILE}`)"
        )
    ran, full = _compute(runner, finished)
    if full:
        saved = 1 - ran / full
        lines.append(
            f"- compute: the finished trials ran {ran} optimizer steps (all sites), {full} had every one run all its "
            f"rounds: pruning saved {saved:.0%}"
        )
    seconds = [t.user_attrs.get(SECONDS) for t in finished if isinstance(t.user_attrs.get(SECONDS), (int, float))]
    if seconds:
        lines.append(
            f"- wall time: {sum(seconds):.0f} s over the finished trials ({sum(seconds) / len(seconds):.0f} s a trial)"
        )
    keys = list(tc.space)
    lines += table_head(
        ["trial", "state", *[f"`{k}`" for k in keys], tc.metric, "rounds run", "seconds", "note"], "Trials"
    )
    for t in trials:
        a = t.user_attrs
        note = f"continues trial {a[RESUMES]}" if a.get(RESUMES) not in (None, t.number) else ""
        if t.state == st.FAIL and not note:
            note = "invalid parameters" if a.get(INVALID) else "interrupted or failed"
        value = "–" if t.value is None else fmt(t.value, ".4f")
        if t.state == st.PRUNED and t.intermediate_values:
            value = f"({fmt(t.intermediate_values[max(t.intermediate_values)], '.4f')} at round {max(t.intermediate_values)})"
        shown = [
            fmt(t.params[k], ".3g") if isinstance(t.params.get(k), float) else md(t.params.get(k, "–")) for k in keys
        ]
        rounds = f"{a.get(ROUNDS_RUN, '–')} of {a.get(ROUNDS, '–')}"
        secs = a.get(SECONDS)
        lines.append(
            f"| {t.number}{' (best)' if best is not None and t.number == best.number else ''} | {t.state.name.lower()} | "
            + " | ".join(shown)
            + f" | {value} | {rounds} | {fmt(secs, '.0f') if isinstance(secs, (int, float)) else '–'} | {note} |"
        )
    lines += ["", f"Every trial as CSV: `{TABLE_FILE}`. Each finished trial's own report: `trials/trial-NNNN/report.md` (kept for the best {tc.keep}"
              + (" and the pruned ones" if tc.keep_pruned else "") + ")."]  # fmt: skip
    if plots or skipped:
        lines += ["", "## Plots", ""]
        for name in plots:
            lines += [f"![{name}]({name})", ""]
        for name, why in skipped.items():
            lines.append(f"- {name}: not drawn ({md(why)})")
    return "\n".join(lines).rstrip() + "\n"


def _plots(runner: Study) -> tuple[list[str], dict[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return [], {"plots": "matplotlib is not installed: pip install 'fedtune[plot]'"}
    st = runner.optuna.trial.TrialState
    complete = [t for t in runner.study.get_trials(deepcopy=False, states=(st.COMPLETE,)) if _finite(t.value)]
    with_rounds = [t for t in runner.study.get_trials(deepcopy=False) if t.intermediate_values]
    draws = {
        "history.png": (
            lambda: ovm.plot_optimization_history(runner.study),
            len(complete) >= 1,
            "no completed trial yet",
        ),
        "importances.png": (
            lambda: ovm.plot_param_importances(runner.study),
            len(complete) >= 2 and len(runner.cfg.tune.space) >= 1,
            "needs 2 completed trials",
        ),
        "slice.png": (lambda: ovm.plot_slice(runner.study), len(complete) >= 1, "no completed trial yet"),
        "rounds.png": (
            lambda: ovm.plot_intermediate_values(runner.study),
            bool(with_rounds),
            "no trial has a round yet",
        ),
    }
    made, skipped = [], {}
    for name, (draw, possible, why) in draws.items():
        path = runner.out / name
        if not possible:
            skipped[name] = why
            path.unlink(missing_ok=True)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            fig = _figure(axes)
            _label(name, axes, runner.cfg.tune.metric)
            fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
            plt.close(fig)
            made.append(name)
        except Exception as e:  # noqa: BLE001 - a plot Optuna cannot draw for these trials: said in the report
            skipped[name] = f"{type(e).__name__}: {e}"
            plt.close("all")
    return made, skipped


def _label(name: str, axes, metric: str) -> None:
    """Optuna's generic labels in the study's words: rounds, the metric; log axes without minor labels."""
    from matplotlib.ticker import NullFormatter

    every = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax in every:
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    first = every[0]
    if name == "rounds.png":
        first.set_xlabel("round")
        first.set_ylabel(f"federated {metric}")
        first.set_title("Each trial's rounds (what the pruner saw)")
    elif name == "history.png":
        first.set_ylabel(f"federated {metric}")
    elif name == "slice.png":
        first.set_ylabel(f"federated {metric}")


def _figure(axes):
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
