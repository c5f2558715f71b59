"""The run config: one typed tree, defaults in code, YAML files and `--set a.b=c` override it.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error that
names the key path, the bad value and the closest valid key. Each component receives only its own
section (an `EngineConfig`, a `LearnerConfig`), never the whole `RunConfig`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cai_ray.config.evaluate import EvaluateConfig
from cai_ray.config.learner import LearnerConfig, SFTConfig
from cai_ray.config.rl import RLTrainConfig
from cai_ray.config.safe_yaml import problem_of, safe_load
from cai_ray.config.sections import (  # noqa: F401
    DEFAULT_BOILERPLATE_PHRASES,
    EngineConfig,
    PoolConfig,
    Section,
    VLLMConfig,
)
from cai_ray.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ModelConfig(Section):
    """A model: a local HF directory (`path`), a GGUF file imported once into the run directory
    (`gguf`), or a project preset with random weights built on first use (`preset`, over the
    project's tokenizer or any real one given as `tokenizer`)."""

    preset: str | None = None
    path: str | None = None
    gguf: str | None = Field(
        None, description="a .gguf file, converted once to an HF directory under run_dir/models/"
    )
    tokenizer: str | None = Field(
        None, description="preset only: build it over this tokenizer directory (a real vocabulary)"
    )
    seed: int = 0  # random-weight seed for presets
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments to this model's chat template, e.g. {enable_thinking: false}",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if sum(x is not None for x in (self.preset, self.path, self.gguf)) != 1:
            raise ValueError(
                "set exactly one of 'preset' (e.g. tiny-1m), 'path' (an HF dir) or 'gguf' (a file)"
            )
        if self.tokenizer is not None and self.preset is None:
            raise ValueError("'tokenizer' goes with 'preset' (a random model over that tokenizer)")
        return self

    def derived(self, path: str | Path) -> ModelConfig:
        """A model trained from this one (e.g. the SL-CAI checkpoint): its own path, this one's
        chat-template arguments."""
        return ModelConfig(path=str(path), chat_template_kwargs=self.chat_template_kwargs)


# Stop strings of the paper's transcript layout: a turn or a constitution marker ends a sample.
DEFAULT_STOP = ("\n\nHuman:", "\n\nAssistant:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:")


class GenerationConfig(Section):
    """Sampling defaults. Paper: temperature 1.0 for responses, critiques and revisions."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    stop: tuple[str, ...] = DEFAULT_STOP


class ModelsConfig(Section):
    """The roles' models. `base`, `feedback` and `critique` default to the helpful model."""

    helpful: ModelConfig = ModelConfig(preset="tiny-1m")
    base: ModelConfig | None = None  # the model SL-CAI fine-tunes (None: the helpful model)
    critique: ModelConfig | None = None
    feedback: ModelConfig | None = None
    reward: ModelConfig | None = None  # the PM's start; None: `base`, else `helpful` (+ new head)

    # The fallbacks, resolved here once: None means the helpful model. The config keeps None
    # (what the user wrote), so config.yaml and its hash stay as they were.
    @property
    def base_model(self) -> ModelConfig:
        return self.base or self.helpful

    @property
    def critique_model(self) -> ModelConfig:
        return self.critique or self.helpful

    @property
    def feedback_model(self) -> ModelConfig:
        return self.feedback or self.helpful


class DataConfig(Section):
    """Prompt sources: a file path, an HF datasets dir, or `sample:NAME` (embedded data)."""

    red_team: str = "sample:red_team"
    helpful: str = "sample:helpful"
    turns: Literal["first", "every"] = "first"
    limit: int | None = Field(None, ge=1, description="read at most this many prompts per source")


class RayConfig(Section):
    """How the driver joins Ray: a local cluster by default, `address: auto` inside a job."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local cluster")
    namespace: str = "cai-ray"
    batch_timeout_s: float = Field(
        1800, gt=0, description="fail if no result arrives for this long"
    )


class SLGenerateConfig(Section):
    """Stage 1: initial answers, then N critique -> revision rounds (paper: 4)."""

    rounds: int = Field(4, ge=1)
    direct_revision: bool = False
    few_shot: int | None = Field(None, ge=0, description="few-shot examples prepended (None: all)")
    too_long: Literal["reject", "truncate"] = "truncate"
    rollout: PoolConfig = PoolConfig()
    critique: PoolConfig = PoolConfig()
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")
    helpful_samples: int = Field(0, ge=0, description="answers per helpfulness prompt (paper: 2)")


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of one deployment (replaces a fixed `num_replicas`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DeploymentConfig(Section):
    """Replicas and admission limits of one Serve deployment."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None  # set: autoscale instead of num_replicas
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica holds at once")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="model deployments: most requests run as one engine batch (None: "
        "max_ongoing_requests; 1: no batching)",
    )
    batch_wait_s: float = Field(
        0.0,
        ge=0,
        description="model deployments: how long a request waits for a batch to fill (0: a "
        "batch is what queued while the previous one ran)",
    )
    max_queued_requests: int = Field(64, ge=-1, description="-1: unbounded queue")
    # Half a CPU each: ingress + policy + PM + constitution fit a 2-CPU machine (1.6 CPUs).
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica, e.g. {accel: 1}"
    )
    max_constructor_retry_count: int | None = Field(
        None, ge=1, description="replica starts before a deploy fails (None: Serve's)"
    )
    access_log: bool = Field(
        False, description="Serve's per-request log line in the replica's log (costs CPU)"
    )
    # Serve finds a killed replica at its next health check and only then starts a new one;
    # the check is a no-op call here (no `check_health` method), so check every 2 s, not 10.
    health_check_period_s: float = Field(2, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _batch_fits(self) -> DeploymentConfig:
        if self.max_batch_size is None:
            object.__setattr__(self, "max_batch_size", self.max_ongoing_requests)  # frozen
        elif self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size {self.max_batch_size} is over max_ongoing_requests "
                f"{self.max_ongoing_requests}: a replica never holds that many requests; raise "
                "max_ongoing_requests or lower max_batch_size"
            )
        return self

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is not a custom resource: use num_cpus / num_gpus")
            if amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
        return value


class ServeConfig(Section):
    """`cai-ray serve`: the policy, the PM and the constitution over HTTP (Ray Serve).

    Models default to the run's outputs: policy rl-train/hf, else sl-train/hf, else
    `models.helpful`; reward pm-train/hf, else `reward`; critique `models.critique` or the policy.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "cai-ray"
    policy_name: str = "policy"
    reward_name: str = "reward"
    policy_path: str | None = None
    reward_path: str | None = None
    critique_path: str | None = None
    reward: ModelConfig | None = None  # a trained PM dir; a preset is a random classifier
    ingress: DeploymentConfig = DeploymentConfig(
        num_cpus=0.1, max_ongoing_requests=64
    )  # no batching
    policy: DeploymentConfig = DeploymentConfig()
    reward_model: DeploymentConfig = DeploymentConfig()
    constitution: DeploymentConfig = DeploymentConfig()
    auth_token_env: str | None = "CAI_RAY_API_TOKEN"
    auth_token_file: str | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_tokens_limit: int = Field(256, ge=1, description="largest max_tokens a request may ask")
    max_n: int = Field(4, ge=1)
    max_batch: int = Field(32, ge=1, description="most conversations per /v1/score request")
    max_rounds: int = Field(4, ge=1, description="most critique rounds per /v1/critique request")
    request_timeout_s: float = Field(120, gt=0)
    deploy_timeout_s: float = Field(
        300, gt=0, description="fail (and tear down) if the replicas are not healthy by then"
    )
    fit_check: bool = Field(
        True,
        description="fail before deploying if the deployments ask more than the cluster has "
        "(false: a cluster that autoscales, adding nodes on demand)",
    )


class RLPairsConfig(Section):
    """Stage 3: responses of the SL-CAI model to red-team prompts (paper: 2 per prompt, T = 1).

    With more than 2 samples, `temperatures` spreads them round robin over several temperatures
    and stage 4 keeps the best and worst after labelling (NeMo-Aligner's variant).
    """

    samples_per_prompt: int = Field(2, ge=2)
    temperatures: tuple[float, ...] | None = Field(None, min_length=1)
    rollout: PoolConfig = PoolConfig()
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")


class RLLabelConfig(Section):
    """Stage 4: multiple-choice AI feedback labels (paper section 4.1)."""

    principles_per_label: int = Field(
        1, ge=1, description="K distinct principles averaged (paper: 1; more than exist: all)"
    )
    both_orders: bool = Field(True, description="score (A, B) and (B, A), average: position bias")
    mode: Literal["soft", "hard", "clamped"] = "soft"
    clamp: tuple[float, float] = (0.4, 0.6)
    cot: bool = Field(False, description="chain of thought: a rationale, then the options")
    cot_samples: int = Field(1, ge=1, description="rationales averaged per query")
    cot_max_new_tokens: int = Field(128, ge=1)
    few_shot: int | None = Field(None, ge=0, description="few-shot examples prepended (None: all)")
    labeler: PoolConfig = PoolConfig()
    shard_rows: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _clamp_range(self) -> RLLabelConfig:
        low, high = self.clamp
        if not 0 <= low <= 0.5 <= high <= 1:
            raise ValueError(f"clamp must satisfy 0 <= low <= 0.5 <= high <= 1, got {self.clamp}")
        return self


class PMTrainConfig(Section):
    """Stage 5: a preference model trained with the Bradley-Terry loss on soft labels.

    `helpful_per_ai_pair` is human helpfulness comparisons per AI-labelled comparison (0 = none),
    read from `helpful_source` (hh-rlhf layout).
    """

    learner: LearnerConfig = LearnerConfig()
    helpful_per_ai_pair: float = Field(
        0.0, ge=0, description="human helpfulness comparisons mixed in per AI-labelled one"
    )
    helpful_source: str = Field(
        "sample:hh_helpful_pairs", description="human comparisons, hh-rlhf layout"
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of comparisons")


class RunConfig(Section):
    """The whole run. Stages add their sections here as they land."""

    run_dir: str = "runs/local-tiny"
    seed: int = 0
    constitution: str = "constitutions/default.yaml"
    format: Literal["transcript", "chat"] = "transcript"
    models: ModelsConfig = ModelsConfig()
    engine: EngineConfig = EngineConfig()
    generation: GenerationConfig = GenerationConfig()
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    refusal_phrases: tuple[str, ...] = Field(
        DEFAULT_BOILERPLATE_PHRASES,
        description="a response containing one (case-insensitive) counts as a refusal: "
        "rl-train's refusal rate and reward.refusal_penalty, evaluate's refusal rates",
    )
    sl_generate: SLGenerateConfig = SLGenerateConfig()
    sl_train: SFTConfig = SFTConfig()
    rl_pairs: RLPairsConfig = RLPairsConfig()
    rl_label: RLLabelConfig = RLLabelConfig()
    pm_train: PMTrainConfig = PMTrainConfig()
    rl_train: RLTrainConfig = RLTrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("run_dir")
    @classmethod
    def _local_run_dir(cls, value: str) -> str:
        # Every stage reads and writes run_dir through local paths: a URI would silently become
        # a local folder named "s3:". On a cluster, use a mount every node shares (NFS).
        if "://" in value:
            raise ValueError(
                "run_dir must be a file system path: URIs (s3://, gs://) are not supported yet; "
                "on a cluster mount shared storage (e.g. NFS) at the same path on every node"
            )
        return value

    @property
    def judge_settings(self) -> EvaluateConfig:
        """`evaluate` with its fallback to another section resolved: `few_shot` None is
        `rl_label.few_shot`, so stage 7's judge asks as stage 4's labeller did."""
        e = self.evaluate
        if e.few_shot is not None:
            return e
        return e.model_copy(update={"few_shot": self.rl_label.few_shot})

    def content_hash(self) -> str:
        """sha256 of the resolved config, recorded in every stage manifest."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Defaults <- YAML file <- `--set key=value` overrides, validated as one tree."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        data = _read_yaml(Path(path))
        origin = str(path)
    for item in overrides:
        _apply_override(data, item)
        origin = f"{origin} + --set"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, origin) from None


def resolve_path(path: str | Path) -> Path:
    """A relative path is tried from the working directory, then from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_project = PROJECT_ROOT / p
    return in_project if in_project.exists() else p


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            "config file not found",
            where=str(path),
            hint="pass a YAML file, e.g. configs/local-tiny.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
        data = safe_load(text)
    except yaml.YAMLError as exc:
        line, problem = problem_of(exc, text)
        where = f"{path}:{line}" if line is not None else str(path)
        raise ConfigError(
            f"malformed YAML: {problem}", where=where, hint="fix the YAML syntax"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config: {exc}", where=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of config keys at the top level, got {type(data).__name__}",
            where=str(path),
        )
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set engine.threads=2")
    try:
        value = safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # e.g. `--set seed=2001-13-45`: kept as text, so validation names the key
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            at = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {item!r}: '{at}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# Keys that were renamed or moved: the old name is an error that names the new one.
MOVED = {
    "sl_train.helpful_ratio": "sl_train.helpful_per_revision",
    "pm_train.helpful_ratio": "pm_train.helpful_per_ai_pair",
    "rl_train.refusal_phrases": "refusal_phrases",
    "evaluate.refusal_phrases": "refusal_phrases",
}


def _config_error(exc: ValidationError, origin: str) -> ConfigError:
    lines = [_describe(err) for err in exc.errors()]
    return ConfigError(
        "invalid config:\n  " + "\n  ".join(lines),
        where=origin,
        hint="see configs/local-tiny.yaml and README 'Configuration' for every key",
    )


def _describe(err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        if key in MOVED:
            return f"{key}: this key is now '{MOVED[key]}' (same meaning): rename it"
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        fix = f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
        return f"{key}: unknown key. {fix} valid keys here: {', '.join(valid)}".replace(
            ". ", ". ", 1
        )
    shown = json.dumps(value, default=str)[:80] if value is not None else "null"
    return f"{key} = {shown}: {err['msg']}"


def _fields_at(loc: list[str]) -> list[str]:
    """Valid keys of the section at `loc` (for 'did you mean' on typos)."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if model else None
        model = _section_type(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _section_type(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
