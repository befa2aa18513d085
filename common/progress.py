"""Progress for long work: a text bar with the share done and an ETA, as the coordinator and
ftsim's baselines print it."""

from __future__ import annotations


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600} h {s % 3600 // 60:02d} min"
        if s >= 3600
        else f"{s // 60} min {s % 60:02d} s"
        if s >= 60
        else f"{s} s"
    )


def bar(frac: float, spent: float, width: int = 20) -> str:
    """``▕██████░░░░▏ 30%, ETA 1 min 10 s``: ``frac`` of the work done in ``spent`` seconds; the
    ETA assumes the rest goes at the same pace (none before anything is done)."""
    frac = min(1.0, max(0.0, frac))
    filled = round(width * frac)
    eta = spent * (1 - frac) / frac if frac > 0 else None
    return f"▕{'█' * filled}{'░' * (width - filled)}▏ {100 * frac:.0f}%" + (
        f", ETA {duration(eta)}" if eta is not None else ""
    )
