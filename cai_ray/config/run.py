"""The run config: one typed tree, defaults in code, YAML files and `--set a.b=c` override it.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error that
names the key path, the bad value and the closest valid key. Each component receives only its own
section (an `EngineConfig`, a `LearnerConfig`), never the whole `RunConfig`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
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

    preset: str | None = Field(
        None,
        description="a project preset with random weights (tiny-1m, tiny-20m, tiny-100m), built "
        "once under run_dir/models/",
    )
    path: str | None = Field(None, description="a local HF model directory")
    gguf: str | None = Field(
        None, description="a .gguf file, converted once to an HF directory under run_dir/models/"
    )
    tokenizer: str | None = Field(
        None, description="preset only: build it over this tokenizer directory (a real vocabulary)"
    )
    seed: int = Field(0, description="preset only: the seed of its random weights")
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

    temperature: float = Field(1.0, ge=0, description="0: greedy (paper: 1.0)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: off)")
    max_new_tokens: int = Field(
        64, ge=1, description="most tokens per sample; a sample cut there is counted as unfinished"
    )
    stop: tuple[str, ...] = Field(
        DEFAULT_STOP,
        description="a sample ends before the first of these strings (the paper's transcript "
        "turn and constitution markers)",
    )


class ModelsConfig(Section):
    """The roles' models. `base`, `feedback` and `critique` default to the helpful model."""

    helpful: ModelConfig = Field(
        ModelConfig(preset="tiny-1m"),
        description="the helpful-only model: stage 1's answers, the policy of stages 3 and 6 "
        "until sl-train/hf exists, evaluate's `helpful` checkpoint",
    )
    base: ModelConfig | None = Field(
        None,
        description="the model SL-CAI fine-tunes (stage 2), whose chat-template arguments the "
        "trained checkpoints keep (None: the helpful model)",
    )
    critique: ModelConfig | None = Field(
        None, description="writes stage 1's critiques and revisions (None: the helpful model)"
    )
    feedback: ModelConfig | None = Field(
        None,
        description="stage 4's labeller, stage 7's judge, rl_train.reward kind rlaif (None: the "
        "helpful model; in serve: the critique model)",
    )
    reward: ModelConfig | None = Field(
        None,
        description="the PM's start, given a new scalar head unless it is a PM already (None: "
        "`base`, else `helpful`)",
    )

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

    red_team: str = Field(
        "sample:red_team", description="red-team prompts: stages 1 and 3, stage 6's red-team share"
    )
    helpful: str = Field(
        "sample:helpful",
        description="helpfulness prompts: stage 1's helpful answers (sl_generate.helpful_samples), "
        "stage 6's rl_train.helpful_fraction",
    )
    turns: Literal["first", "every"] = Field(
        "first",
        description="which user turns of a conversation become prompts: the first, or every one "
        "(with the conversation before it)",
    )
    limit: int | None = Field(None, ge=1, description="read at most this many prompts per source")


class RayConfig(Section):
    """How the driver joins Ray: a local cluster by default, `address: auto` inside a job."""

    address: str | None = Field(
        None,
        description="ray.init address (None: start a local cluster; auto: join the running one)",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of a local cluster (None: the machine's)"
    )
    namespace: str = Field("cai-ray", description="the Ray namespace the driver joins")
    batch_timeout_s: float = Field(
        1800, gt=0, description="seconds a Ray Data stage may go without a result before it fails"
    )


class SLGenerateConfig(Section):
    """Stage 1: initial answers, then N critique -> revision rounds (paper: 4)."""

    rounds: int = Field(4, ge=1, description="critique -> revision rounds per chain (paper: 4)")
    direct_revision: bool = Field(
        False, description="skip the critique and revise directly (the paper's ablation)"
    )
    few_shot: int | None = Field(None, ge=0, description="few-shot examples prepended (None: all)")
    too_long: Literal["reject", "truncate"] = Field(
        "truncate",
        description="a prompt over the model's context less max_new_tokens: truncate drops the "
        "earliest turns (answers) or few-shot examples (critiques, revisions); reject sets it aside",
    )
    rollout: PoolConfig = Field(
        PoolConfig(), description="the helpful model's pool: initial and helpful answers"
    )
    critique: PoolConfig = Field(
        PoolConfig(), description="the critique model's pool: critiques and revisions"
    )
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")
    helpful_samples: int = Field(0, ge=0, description="answers per helpfulness prompt (paper: 2)")


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of one deployment (replaces a fixed `num_replicas`)."""

    min_replicas: int = Field(1, ge=0, description="replicas started at deploy and kept")
    max_replicas: int = Field(2, ge=1, description="most replicas Serve scales up to")
    target_ongoing_requests: float = Field(
        2, gt=0, description="requests per replica Serve scales towards"
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DeploymentConfig(Section):
    """Replicas and admission limits of one Serve deployment."""

    num_replicas: int = Field(1, ge=1, description="fixed replicas (unread with autoscaling)")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="set: autoscale instead of num_replicas"
    )
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
    num_cpus: float = Field(
        0.5,
        ge=0,
        description="CPUs per replica; half a CPU each: ingress + policy + PM + constitution "
        "fit a 2-CPU machine (1.6 CPUs)",
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (fractional: a shared GPU)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica, e.g. {accel: 1}"
    )
    max_constructor_retry_count: int | None = Field(
        None, ge=1, description="replica starts before a deploy fails (None: Serve's)"
    )
    access_log: bool = Field(
        False, description="Serve's per-request log line in the replica's log (costs CPU)"
    )
    health_check_period_s: float = Field(
        2,
        gt=0,
        description="seconds between Serve's health checks; a killed replica is replaced only "
        "after one, and the check is a no-op call, so every 2 s (Serve's default: 10)",
    )
    health_check_timeout_s: float = Field(
        30, gt=0, description="seconds a health check may take before the replica counts as dead"
    )

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


class IngressConfig(DeploymentConfig):
    """The HTTP front: a DeploymentConfig that is light (0.1 CPU) and holds more requests (64).
    Its own class, so a written `serve.ingress` section keeps these defaults."""

    num_cpus: float = Field(0.1, ge=0, description="CPUs per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica holds at once")


class ServeConfig(Section):
    """`cai-ray serve`: the policy, the PM and the constitution over HTTP (Ray Serve).

    Models default to the run's outputs: policy rl-train/hf, else sl-train/hf, else
    `models.helpful`; reward pm-train/hf, else `reward`; critique `models.critique` or the policy.
    """

    host: str = Field("127.0.0.1", description="HTTP bind address (--host)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (--port)")
    route_prefix: str = Field("/", description="URL prefix of the app's routes")
    app_name: str = Field("cai-ray", description="the Serve application's name")
    policy_name: str = Field(
        "policy", description="the policy's `model` name in the API (its model id works too)"
    )
    reward_name: str = Field("reward", description="the PM's `model` name in the API")
    policy_path: str | None = Field(
        None, description="policy HF dir (None: rl-train/hf, sl-train/hf, models.helpful)"
    )
    reward_path: str | None = Field(
        None, description="PM dir (None: pm-train/hf, else serve.reward, else no PM: 503)"
    )
    critique_path: str | None = Field(
        None, description="critique model dir (None: models.critique, else the policy)"
    )
    reward: ModelConfig | None = Field(
        None,
        description="the PM when reward_path is unset and pm-train/hf is absent: a trained PM "
        "dir; a preset is a random classifier",
    )
    ingress: IngressConfig = Field(
        IngressConfig(), description="the HTTP front (no batching): 0.1 CPU, 64 requests"
    )
    policy: DeploymentConfig = Field(
        DeploymentConfig(), description="the policy: /v1/chat/completions, /v1/completions"
    )
    reward_model: DeploymentConfig = Field(
        DeploymentConfig(), description="the PM: /v1/score, /v1/compare"
    )
    constitution: DeploymentConfig = Field(
        DeploymentConfig(),
        description="the critique and feedback models: /v1/critique, /v1/label",
    )
    auth_token_env: str | None = Field(
        "CAI_RAY_API_TOKEN",
        description="environment variable holding the bearer token (unset or empty: no auth)",
    )
    auth_token_file: str | None = Field(
        None, description="file holding the bearer token; wins over auth_token_env"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 above)")
    max_prompt_tokens: int = Field(
        1024, ge=1, description="longest prompt, in tokens, a policy request may send"
    )
    max_tokens_limit: int = Field(256, ge=1, description="largest max_tokens a request may ask")
    max_n: int = Field(4, ge=1, description="most samples (`n`) per completion request")
    max_batch: int = Field(32, ge=1, description="most conversations per /v1/score request")
    max_rounds: int = Field(4, ge=1, description="most critique rounds per /v1/critique request")
    request_timeout_s: float = Field(
        120, gt=0, description="seconds the ingress gives a request before it answers 503"
    )
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

    samples_per_prompt: int = Field(2, ge=2, description="responses per prompt (paper: 2)")
    temperatures: tuple[float, ...] | None = Field(
        None,
        min_length=1,
        description="samples spread round robin over these (None: generation.temperature)",
    )
    rollout: PoolConfig = Field(PoolConfig(), description="the policy's pool, one per temperature")
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")


class RLLabelConfig(Section):
    """Stage 4: multiple-choice AI feedback labels (paper section 4.1)."""

    principles_per_label: int = Field(
        1, ge=1, description="K distinct principles averaged (paper: 1; more than exist: all)"
    )
    both_orders: bool = Field(True, description="score (A, B) and (B, A), average: position bias")
    mode: Literal["soft", "hard", "clamped"] = Field(
        "soft",
        description="the label: soft P(A) (paper: trains best), hard 1/0 (0.5 on a tie), or "
        "clamped into `clamp`",
    )
    clamp: tuple[float, float] = Field(
        (0.4, 0.6),
        description="(low, high): each chain-of-thought P(A) is clamped into it, and the label "
        "with mode clamped (paper: 0.4, 0.6)",
    )
    cot: bool = Field(False, description="chain of thought: a rationale, then the options")
    cot_samples: int = Field(1, ge=1, description="rationales averaged per query")
    cot_max_new_tokens: int = Field(128, ge=1, description="longest rationale, in tokens")
    few_shot: int | None = Field(None, ge=0, description="few-shot examples prepended (None: all)")
    labeler: PoolConfig = Field(PoolConfig(), description="the feedback model's pool")
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")

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

    learner: LearnerConfig = Field(
        LearnerConfig(),
        description="the PM's learner group; it checkpoints (and scores held-out pairs) at every "
        "epoch end unless checkpoint_every is set",
    )
    helpful_per_ai_pair: float = Field(
        0.0, ge=0, description="human helpfulness comparisons mixed in per AI-labelled one"
    )
    helpful_source: str = Field(
        "sample:hh_helpful_pairs", description="human comparisons, hh-rlhf layout"
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of comparisons")


class RunConfig(Section):
    """The whole run. Stages add their sections here as they land."""

    run_dir: str = Field(
        "runs/local-tiny",
        description="every stage's outputs and built models; a file system path (on a cluster: "
        "a mount every node shares)",
    )
    seed: int = Field(
        0,
        description="the run's seed: sampling, principle draws, held-out splits and subsamples",
    )
    constitution: str = Field(
        "constitutions/default.yaml", description="the constitution YAML file"
    )
    format: Literal["transcript", "chat"] = Field(
        "transcript",
        description="how models read conversations: the paper's Human/Assistant transcript, or "
        "each model's chat template",
    )
    models: ModelsConfig = Field(ModelsConfig(), description="the models of every role")
    engine: EngineConfig = Field(
        EngineConfig(),
        description="the generation engine of every role whose own `engine` is unset",
    )
    generation: GenerationConfig = Field(
        GenerationConfig(),
        description="sampling of every stage (rl_train, evaluate, rl_label override some keys)",
    )
    data: DataConfig = Field(DataConfig(), description="the training stages' prompt sources")
    ray: RayConfig = Field(RayConfig(), description="how the driver joins Ray")
    refusal_phrases: tuple[str, ...] = Field(
        DEFAULT_BOILERPLATE_PHRASES,
        description="a response containing one (case-insensitive) counts as a refusal: "
        "rl-train's refusal rate and reward.refusal_penalty, evaluate's refusal rates",
    )
    sl_generate: SLGenerateConfig = Field(
        SLGenerateConfig(), description="stage 1: critique -> revision chains"
    )
    sl_train: SFTConfig = Field(SFTConfig(), description="stage 2: SL-CAI fine-tuning")
    rl_pairs: RLPairsConfig = Field(
        RLPairsConfig(), description="stage 3: response pairs of the SL-CAI model"
    )
    rl_label: RLLabelConfig = Field(
        RLLabelConfig(), description="stage 4: AI feedback labels of the pairs"
    )
    pm_train: PMTrainConfig = Field(PMTrainConfig(), description="stage 5: the preference model")
    rl_train: RLTrainConfig = Field(
        RLTrainConfig(), description="stage 6: RL-CAI (PPO, GRPO, RLOO) or offline DPO"
    )
    evaluate: EvaluateConfig = Field(
        EvaluateConfig(), description="stage 7: checkpoints judged pairwise -> Elo"
    )
    serve: ServeConfig = Field(ServeConfig(), description="`cai-ray serve`: the HTTP API")

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
        if not isinstance(child, dict) or _is_value(parts[: i + 1]):
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
# Keys that were removed: the old name is an error that says why.
REMOVED = {
    "sl_train.helpful_source": "stage 2 mixes in stage 1's helpful answers (sl_generate."
    "helpful_samples on data.helpful); to train on other prompts, point data.helpful at them",
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
        if key in REMOVED:
            return f"{key}: this key was removed: {REMOVED[key]}"
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        fix = f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
        return f"{key}: unknown key. {fix} valid keys here: {', '.join(valid)}".replace(
            ". ", ". ", 1
        )
    shown = json.dumps(value, default=str)[:80] if value is not None else "null"
    return f"{key} = {shown}: {err['msg']}"


def _is_value(loc: list[str]) -> bool:
    """Whether the schema's key at `loc` holds a plain value: neither a section nor a mapping
    (`reward.kwargs`, `chat_template_kwargs`), so `--set a.b=c` cannot go inside it."""
    model: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _section_type(field.annotation) if field else None
    field = model.model_fields.get(loc[-1]) if model else None
    if field is None:
        return False  # an unknown key: validation names it with the closest valid one
    ann = field.annotation
    kinds = (ann, *typing.get_args(ann))
    mapping = any(k is dict or typing.get_origin(k) is dict for k in kinds)
    return _section_type(ann) is None and not mapping


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
