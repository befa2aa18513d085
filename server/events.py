"""Per-round metrics as TensorBoard event files (``output.tensorboard``; the ``tensorboard``
extra), so a run can be watched and compared with the tools people already use:
``tensorboard --logdir RUN/tensorboard``. Only metrics, the same as metrics.json."""

from __future__ import annotations

import math
from pathlib import Path


class EventWriter:
    """Writes each finished round's figures under ``out/tensorboard`` (step = round)."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("output.tensorboard needs TensorBoard: pip install 'fedtune[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def round(self, record: dict) -> None:
        step = int(record["round"])
        scalars = {f"federation/{k}": v for k, v in (record.get("aggregate") or {}).items()}
        for key in ("update_norm", "update_bytes", "seconds", "aggregation_error_rel", "accepted"):
            scalars[f"round/{key}"] = record.get(key)
        scalars["privacy/epsilon"] = (record.get("privacy") or {}).get("epsilon")
        for layer, norm in (record.get("layer_change") or {}).items():
            scalars[f"layer_change/{layer}"] = norm
        for site, s in (record.get("sites") or {}).items():
            for key in ("eval_loss", "exact_match", "train_loss", "update_norm", "cosine_to_aggregate"):
                scalars[f"site/{site}/{key}"] = s.get(key)
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
