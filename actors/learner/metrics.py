"""Per-step training metrics: `metrics.jsonl`, TensorBoard, and optionally W&B and MLflow.

The driver writes them: it receives every step's metrics from the group anyway (for the progress
bar), so there is one writer and no file on a worker node. A resumed run first drops the lines of
steps after its checkpoint, so each step appears once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cai_ray.config.learner import LearnerConfig
from cai_ray.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")


class MetricsSink:
    """Appends one JSON line per optimizer step and mirrors the scalars to the enabled loggers."""

    def __init__(
        self,
        out_dir: str | Path,
        config: LearnerConfig,
        *,
        resume_step: int = 0,
        scalars: tuple[str, ...] = SCALARS,
    ):
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step)
        self._file = self.path.open("a")
        self._scalars = scalars
        self._tb = _tensorboard(Path(out_dir) / "tensorboard") if config.tensorboard else None
        self._wandb = _wandb(Path(out_dir)) if config.wandb else None
        self._mlflow = _mlflow() if config.mlflow else None

    def log(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self._file.write(json.dumps(row, sort_keys=True) + "\n")
            step = int(row["step"])
            scalars = {k: float(row[k]) for k in self._scalars if row.get(k) is not None}
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(f"train/{key}", value, step)
            if self._wandb is not None:
                self._wandb.log(scalars, step=step)
            if self._mlflow is not None:
                self._mlflow.log_metrics(scalars, step=step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def check_loggers(config: LearnerConfig) -> None:
    """Fail before training starts when an enabled optional logger is not installed."""
    for enabled, module in ((config.wandb, "wandb"), (config.mlflow, "mlflow")):
        if enabled:
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(
                    f"{module} logging is on but {module} is not installed",
                    where=module,
                    hint=f"pip install {module}, or set {module}: false",
                ) from None


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl` (empty when absent)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if step > 0 and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        # TensorBoard is optional (the dev extra): the JSONL file still has everything.
        log.warning("tensorboard is not installed: writing metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(folder))


def _wandb(out_dir: Path) -> Any:
    import wandb

    wandb.init(project="cai-ray", name=out_dir.name, dir=str(out_dir))
    return wandb


def _mlflow() -> Any:
    import mlflow

    mlflow.start_run()
    return mlflow
