"""The run config: one typed tree (`RunConfig`) of frozen sections, loaded by `load_config`.

- `run`: the root, the model/engine/data sections and the stage sections of stages 1-5, and the loader;
- `learner`: a DeepSpeed learner group (`LearnerConfig`) and SFT;
- `rl`: stage 6 (`RLTrainConfig`);
- `evaluate`: stage 7 (`EvaluateConfig`);
- `safe_yaml`: YAML reading that turns every bad value into a line-numbered error.

Callers import section types from here (`from cai_ray.config import EngineConfig`).
"""

from cai_ray.config.run import (  # noqa: F401
    DEFAULT_STOP,
    PROJECT_ROOT,
    AutoscalingConfig,
    DataConfig,
    DeploymentConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    ModelsConfig,
    PMTrainConfig,
    PoolConfig,
    RayConfig,
    RLLabelConfig,
    RLPairsConfig,
    RunConfig,
    Section,
    ServeConfig,
    SLGenerateConfig,
    VLLMConfig,
    load_config,
    resolve_path,
    resolve_threads,
)
