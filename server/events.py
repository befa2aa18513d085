"""Per-round metrics as TensorBoard event files (``output.tensorboard``; the ``tensorboard``
extra), so a run can be watched and compared with the tools people already use:
``tensorboard --logdir RUN/tensorboard``. Only metrics, the same as metrics.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from .record import RoundRecord, Scores

# The figures written per round and per site (RoundRecord's and SiteRound's fields).
ROUND_FIGURES = ("update_norm", "update_bytes", "seconds", "aggregation_error_rel", "accepted")
SITE_FIGURES = ("eval_loss", "exact_match", "train_loss", "update_norm", "cosine_to_aggregate")


class EventWriter:
    """Writes each finished round's figures under ``out/tensorboard`` (step = round)."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("output.tensorboard needs TensorBoard: pip install 'fedtune[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def round(self, record: RoundRecord | Mapping) -> None:
        """One round's figures: a :class:`RoundRecord` or the round's entry in metrics.json."""
        r = record if isinstance(record, RoundRecord) else RoundRecord.model_validate(record)
        scalars = {f"federation/{k}": getattr(r.aggregate, k) for k in Scores.model_fields}
        for key in ROUND_FIGURES:
            scalars[f"round/{key}"] = getattr(r, key)
        scalars["privacy/epsilon"] = r.privacy.epsilon if r.privacy is not None else None
        for layer, norm in (r.layer_change or {}).items():
            scalars[f"layer_change/{layer}"] = norm
        for site, s in r.sites.items():
            for key in SITE_FIGURES:
                scalars[f"site/{site}/{key}"] = getattr(s, key)
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), r.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
