"""Runs stages in order; each is skipped when its manifest says it finished (resume by rerun)."""

from __future__ import annotations

import importlib
import time
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.errors import CaiRayError
from cai_ray.layout import (
    EVALUATE,
    PM_TRAIN,
    RL_LABEL,
    RL_PAIRS,
    RL_TRAIN,
    SL_GENERATE,
    SL_TRAIN,
    STAGES,
)
from cai_ray.profiling import span

# stage -> module with `run(cfg, *, progress) -> manifest` (DPO's own driver: `stage_module`).
IMPLEMENTED = {
    SL_GENERATE: "cai_ray.pipeline.sl_generate",
    SL_TRAIN: "cai_ray.pipeline.sl_train",
    RL_PAIRS: "cai_ray.pipeline.rl_pairs",
    RL_LABEL: "cai_ray.pipeline.rl_label",
    PM_TRAIN: "cai_ray.pipeline.pm_train",
    RL_TRAIN: "cai_ray.pipeline.rl_train",
    EVALUATE: "cai_ray.pipeline.evaluate",
}


def stage_module(name: str, cfg: RunConfig) -> str:
    """The driver module of stage `name`; rl-train with `algorithm: dpo` has its own, offline."""
    if name == RL_TRAIN and cfg.rl_train.algorithm == "dpo":
        return "cai_ray.pipeline.rl_dpo"
    return IMPLEMENTED[name]


def run_stage(name: str, cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    if name not in IMPLEMENTED:
        raise CaiRayError(
            f"stage {name!r} is not implemented in this version",
            hint=f"implemented stages: {', '.join(IMPLEMENTED)}",
        )
    module = importlib.import_module(stage_module(name, cfg))
    with span(f"stage:{name}"):
        return module.run(cfg, progress=progress)


def run_pipeline(
    cfg: RunConfig, *, until: str | None = None, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Every implemented stage up to `until`, in pipeline order."""
    last = STAGES.index(until) if until else len(STAGES) - 1
    manifests = {}
    for name in STAGES[: last + 1]:
        if name not in IMPLEMENTED:
            print(f"{name}: not implemented yet, stopping here")
            break
        t0 = time.perf_counter()
        manifests[name] = run_stage(name, cfg, progress=progress)
        print(f"{name}: done in {time.perf_counter() - t0:.1f}s -> {cfg.run_dir}/{name}")
    _print_summary(manifests)
    return manifests


def _print_summary(manifests: dict[str, dict[str, Any]]) -> None:
    """One line per stage: its outputs' counts, from the manifests."""
    print(f"\n{'stage':<12} outputs")
    for name, manifest in manifests.items():
        outputs = manifest.get("outputs", {})
        parts = []
        for key, value in outputs.items():
            if isinstance(value, dict) and "rows" in value:  # a streamed part
                parts.append(f"{key}: {value.get('rows')} rows, {value.get('rejects')} rejects")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        print(f"{name:<12} {'; '.join(parts)}")
