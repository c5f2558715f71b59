"""Which checkpoints stage 7 compares, and which judge / PM / reference models it uses.

Role names map onto the run directory's layout (DESIGN.md, The pipeline):
`helpful` -> models.helpful, `sl-cai` -> sl-train/hf, `rl-step-N` -> rl-train/snapshots/step-N,
`rl-cai` -> rl-train/hf. A role whose stage has not run is skipped with a note; a path the user
gave that is not a model directory is an error naming the config field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import ModelConfig, RunConfig, resolve_path
from cai_ray.data.shards import atomic_write_text
from cai_ray.errors import CaiRayError, ConfigError
from cai_ray.layout import PM_TRAIN, snapshots_dir, trained_model_dir
from cai_ray.pipeline.common import ModelRef, StageContext

ROLE_DIRS = {"sl-cai": "sl-train/hf", "rl-cai": "rl-train/hf"}
_STEP = re.compile(r"^rl-step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A compared model: its name in tables and Elo, its HF directory and content id."""

    name: str
    path: Path
    id: str

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.path, self.id)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": str(self.path), "model_id": self.id}


def _weights(model_id: str) -> str:
    return model_id.rpartition("@")[2]  # the content hash, without the directory name


def auto_specs(run_dir: Path) -> list[str]:
    """helpful, sl-cai, every RL snapshot by step, rl-cai: the paper's Fig. 2 order."""
    snaps = snapshots_dir(run_dir)
    steps = sorted(
        int(p.name.removeprefix("step-"))
        for p in (snaps.iterdir() if snaps.is_dir() else [])
        if re.fullmatch(r"step-\d+", p.name)
    )
    return ["helpful", "sl-cai", *(f"rl-step-{n}" for n in steps), "rl-cai"]


def _role_path(name: str, run_dir: Path) -> Path | None:
    if name in ROLE_DIRS:
        return run_dir / ROLE_DIRS[name]
    m = _STEP.match(name)
    return snapshots_dir(run_dir) / f"step-{m.group(1)}" if m else None


def resolve_checkpoints(
    cfg: RunConfig, ctx: StageContext
) -> tuple[list[Checkpoint], list[dict[str, str]]]:
    """The checkpoints to compare, in order, and the skipped ones with the reason."""
    from cai_ray.models import check_model_dir, model_id

    run_dir = Path(cfg.run_dir)
    auto = cfg.evaluate.checkpoints == "auto"
    specs = auto_specs(run_dir) if auto else list(cfg.evaluate.checkpoints)
    found: list[Checkpoint] = []
    skipped: list[dict[str, str]] = []
    for i, spec in enumerate(specs):
        spec = spec.strip()
        if spec == "helpful":
            ref = ctx.model(cfg.models.helpful)
            found.append(Checkpoint("helpful", ref.path, ref.id))
            continue
        role = _role_path(spec, run_dir)
        if role is not None:
            if (role / "config.json").is_file():
                path = check_model_dir(role)
                found.append(Checkpoint(spec, path, model_id(path)))
            else:
                skipped.append({"name": spec, "reason": f"no model at {role} (not trained yet)"})
            continue
        name, _, raw = spec.partition("=") if "=" in spec else ("", "", spec)
        path = resolve_path(raw.strip())
        try:
            path = check_model_dir(path)
        except CaiRayError as err:
            raise ConfigError(
                f"checkpoint {spec!r}: {err.message}",
                where=f"evaluate.checkpoints[{i}] ({path})",
                hint="give helpful, sl-cai, rl-cai, rl-step-N, NAME=PATH or an HF model directory",
            ) from None
        found.append(Checkpoint(name.strip() or path.name, path, model_id(path)))
    if auto:
        found, skipped = _drop_final_snapshot(found, skipped)
    names = [c.name for c in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"two checkpoints are named {dup[0]!r}",
            where="evaluate.checkpoints",
            hint="name them: NAME=PATH",
        )
    if not found:
        raise ConfigError(
            "no checkpoint to evaluate: " + "; ".join(s["reason"] for s in skipped),
            where="evaluate.checkpoints",
            hint="run the training stages first, or list model directories",
        )
    return found, skipped


def _drop_final_snapshot(found: list[Checkpoint], skipped: list[dict[str, str]]):
    """The snapshot at the last RL step holds rl-cai's weights: comparing a model with itself
    costs judge calls and tells nothing."""
    final = next((c for c in found if c.name == "rl-cai"), None)
    if final is None:
        return found, skipped
    keep = []
    for c in found:
        if _STEP.match(c.name) and _weights(c.id) == _weights(final.id):
            skipped.append({"name": c.name, "reason": "same weights as rl-cai"})
        else:
            keep.append(c)
    return keep, skipped


def guard_checkpoints(stage_dir: Path, checkpoints: list[Checkpoint]) -> None:
    """A resumed stage must compare the same checkpoints as the shards it already holds."""
    path = stage_dir / "checkpoints.json"
    now = [c.to_dict() for c in checkpoints]
    answered = any((stage_dir / split).glob("shard-*.parquet") for split in ("harmful", "helpful"))
    if path.is_file() and answered:
        before = json.loads(path.read_text())
        key = [(c["name"], _weights(c["model_id"])) for c in before]
        if key != [(c["name"], _weights(c["model_id"])) for c in now]:
            raise ConfigError(
                "this evaluate folder holds answers of other checkpoints: "
                f"{', '.join(c['name'] for c in before)}",
                where=str(path),
                hint="delete the evaluate folder to evaluate the current checkpoints",
            )
    else:  # nothing answered yet: the checkpoints may still change
        atomic_write_text(path, json.dumps(now, indent=2) + "\n")


def optional_model(
    ctx: StageContext, path: str | None, *, field: str, head: str = "causal"
) -> ModelRef | None:
    """A model the user named by path (an error naming `field` if it is not one), or None."""
    if path is None:
        return None
    try:
        return ctx.model(ModelConfig(path=path), head=head)
    except CaiRayError as err:
        raise ConfigError(
            err.message, where=f"{field} ({path})", hint=err.hint or "an HF model directory"
        ) from None


def pm_model(cfg: RunConfig, ctx: StageContext) -> tuple[ModelRef | None, str | None]:
    """The PM that scores answers: `evaluate.pm_model`, else pm-train/hf; else a note why not."""
    e = cfg.evaluate
    if e.pm_model is not None:
        return optional_model(
            ctx, e.pm_model, field="evaluate.pm_model", head="classification"
        ), None
    trained = trained_model_dir(cfg.run_dir, PM_TRAIN)
    if (trained / "config.json").is_file():
        return ctx.model(ModelConfig(path=str(trained)), head="classification"), None
    return None, f"no PM ({trained} absent, evaluate.pm_model unset): PM scores skipped"


def models_record(**refs: ModelRef | None) -> dict[str, Any]:
    return {k: (r.id if r is not None else None) for k, r in refs.items()}
