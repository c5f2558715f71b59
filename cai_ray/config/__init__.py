"""The run config: one typed tree (`RunConfig`) of frozen sections, loaded by `load_config`.

- `sections`: the `Section` contract, the engine, an actor pool, shared defaults;
- `run`: the root, the model/engine/data sections and the stage sections of stages 1-5, and the loader;
- `reference`: `python -m cai_ray.config.reference` writes configs/REFERENCE.md;
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
    GenerationConfig,
    ModelConfig,
    ModelsConfig,
    PMTrainConfig,
    RayConfig,
    RLLabelConfig,
    RLPairsConfig,
    RunConfig,
    ServeConfig,
    SLGenerateConfig,
    load_config,
    resolve_path,
)
from cai_ray.config.sections import (  # noqa: F401
    DEFAULT_BOILERPLATE_PHRASES,
    EngineConfig,
    PoolConfig,
    Section,
    VLLMConfig,
    WorkersConfig,
)
