"""`cai-ray serve` checks that its deployments fit the cluster before it deploys anything (issue 17):
the pure computation over configs and cluster resources, no Ray."""

from __future__ import annotations

import pytest

from cai_ray.config import PROJECT_ROOT, load_config
from cai_ray.errors import ConfigError
from cai_ray.serve.launch import _reason, _timed_out, check_fit, deployment_asks

CONFIGS = PROJECT_ROOT / "configs"
TWO_CPUS = {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9, "node:127.0.0.1": 1.0}
# The defaults before issue 17: a whole CPU per model deployment, 3.1 CPUs in all.
WHOLE_CPUS = [f"serve.{d}.num_cpus=1" for d in ("policy", "reward_model", "constitution")]


def _asks(overrides=(), path=None, reward=True):
    return deployment_asks(load_config(path, list(overrides)).serve, reward=reward)


def _fit_error(asks, cluster, nodes=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_fit(asks, cluster, nodes)
    err = info.value
    assert err.where == "serve"
    assert "\n" not in err.message  # the CLI prints it as one `error:` line (and a hint)
    return err


@pytest.mark.parametrize("path", [None, CONFIGS / "local-tiny.yaml"])
def test_defaults_and_local_tiny_fit_a_two_cpu_machine(path):
    asks = _asks(path=path)
    assert [a.name for a in asks] == ["ingress", "policy", "reward", "constitution"]
    assert sum(a.total("CPU") for a in asks) == pytest.approx(1.6)
    assert all(a.per_replica.keys() == {"CPU"} for a in asks)
    check_fit(asks, TWO_CPUS, [TWO_CPUS])  # no error


def test_whole_cpus_on_two_cpus_name_each_deployment_its_ask_and_the_keys():
    err = _fit_error(_asks(WHOLE_CPUS), TWO_CPUS, [TWO_CPUS])
    assert "3.1 CPU in all" in err.message and "the cluster has 2" in err.message
    for part in ("ingress 1 x 0.1", "policy 1 x 1", "reward 1 x 1", "constitution 1 x 1"):
        assert part in err.message, err.message
    for key in (
        "serve.ingress.num_cpus",
        "serve.policy.num_cpus",
        "serve.policy.num_replicas",
        "serve.reward_model.num_cpus",  # the PM's section, not the deployment's name
        "serve.constitution.num_replicas",
    ):
        assert key in err.hint, err.hint
    assert "ray.num_cpus" in err.hint


def test_without_a_pm_the_reward_deployment_asks_nothing():
    overrides = ["serve.policy.num_cpus=1", "serve.reward_model.num_cpus=0.5"]
    asks = _asks(overrides, reward=False)
    assert [a.name for a in asks] == ["ingress", "policy", "constitution"]
    check_fit(asks, TWO_CPUS)  # 0.1 + 1 + 0.5
    err = _fit_error(_asks(overrides), TWO_CPUS)  # and the PM's 0.5: 2.1
    assert "2.1 CPU in all" in err.message and "reward 1 x 0.5" in err.message


def test_replicas_and_autoscaling_minimum_count():
    asks = _asks(
        [
            "serve.policy={num_replicas: 3, num_cpus: 0.5}",
            "serve.constitution.autoscaling={min_replicas: 2, max_replicas: 4}",
        ]
    )
    by_name = {a.name: a for a in asks}
    assert by_name["policy"].total("CPU") == pytest.approx(1.5)
    assert by_name["constitution"].replicas == 2  # the deploy starts min_replicas
    err = _fit_error(asks, {"CPU": 3.0})
    assert "3.1 CPU in all" in err.message and "policy 3 x 0.5" in err.message
    assert "serve.constitution.autoscaling.min_replicas" in err.hint
    assert "serve.policy.num_replicas" in err.hint
    check_fit(asks, {"CPU": 4.0})


def test_gpu_example_needs_its_gpus():
    asks = _asks(path=CONFIGS / "gpu-cluster.example.yaml")
    assert sum(a.total("GPU") for a in asks) == 4  # 2 policy replicas, the PM, the constitution
    node = {"CPU": 64.0, "GPU": 8.0}
    check_fit(asks, {"CPU": 128.0, "GPU": 16.0}, [node, node])
    err = _fit_error(asks, {"CPU": 128.0}, [{"CPU": 64.0}, {"CPU": 64.0}])
    assert "4 GPU in all" in err.message and "the cluster has 0" in err.message
    assert "policy 2 x 1" in err.message
    assert "serve.policy.num_gpus" in err.hint and "serve.constitution.num_gpus" in err.hint
    assert "serve.ingress" not in err.hint  # the ingress asks no GPU
    assert "largest node has 0" in err.message


def test_custom_resources_are_counted_and_named():
    asks = _asks(["serve.policy={num_replicas: 2, resources: {accel: 1}}"])
    assert asks[1].per_replica == {"CPU": 0.5, "accel": 1.0}
    check_fit(asks, {"CPU": 4.0, "accel": 2.0})
    err = _fit_error(asks, {"CPU": 4.0, "accel": 1.0})
    assert "2 accel in all (policy 2 x 1), the cluster has 1" in err.message
    assert "serve.policy.resources.accel" in err.hint
    with pytest.raises(ConfigError, match="not a custom resource"):
        load_config(None, ["serve.policy.resources={CPU: 1}"])


def test_a_replica_must_fit_on_one_node():
    asks = _asks(["serve.policy.num_cpus=3"])
    small = {"CPU": 2.0}
    check_fit(asks, {"CPU": 8.0})  # the total alone fits
    err = _fit_error(asks, {"CPU": 8.0}, [small] * 4)
    assert "policy asks for 3 CPU a replica, the largest node has 2" in err.message
    assert "in all" not in err.message
    assert "serve.policy.num_cpus" in err.hint


def test_several_problems_in_one_error():
    asks = _asks([*WHOLE_CPUS, "serve.policy.num_gpus=1"])
    err = _fit_error(asks, TWO_CPUS)
    assert "CPU in all" in err.message and "1 GPU in all" in err.message
    assert err.message.index("CPU in all") < err.message.index("GPU in all")


def test_serve_keys_defaults():
    sc = load_config(None).serve
    assert sc.deploy_timeout_s == 300 and sc.fit_check is True
    assert sc.policy.max_constructor_retry_count is None and sc.policy.resources == {}
    with pytest.raises(ConfigError, match="deploy_timeout_s"):
        load_config(None, ["serve.deploy_timeout_s=0"])


def test_the_replica_error_is_pulled_out_of_a_serve_traceback():
    message = (
        "The deployment failed to start 1 times in a row. This may be due to a problem with its "
        "constructor or initial health check failing. See controller logs for details. Error:\n"
        "Traceback (most recent call last):\n"
        '  File "replica.py", line 3, in initialize\n'
        "    raise SafetensorError(...)\n"
        "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge\n"
    )
    assert _reason(message) == (
        "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge"
    )
    assert _reason("Deployment 'x' has 1 replicas waiting.\nmore") == (
        "Deployment 'x' has 1 replicas waiting."
    )
    assert _reason("") == "no reason given"


def test_the_timeout_error_names_what_is_not_healthy():
    from types import SimpleNamespace as NS

    status = NS(
        deployments={
            "ingress": NS(status="HEALTHY", replica_states={"RUNNING": 1}, message=""),
            "reward": NS(status="UPDATING", replica_states={"STARTING": 1}, message=""),
        }
    )
    asks = {a.name: a for a in _asks(["serve.reward_model.resources={accel: 1}"])}
    err = _timed_out(status, 5, "free now: 0 of 2 CPU", asks)
    assert "not healthy after 5 s (serve.deploy_timeout_s)" in err.message
    assert (
        "reward (serve.reward_model) UPDATING [replicas: 1 STARTING], "
        "a replica asks 0.5 CPU + 1 accel: still starting"
    ) in err.message
    assert "ingress" not in err.message and "free now: 0 of 2 CPU" in err.message
    assert "the app was never created" in _timed_out(None, 5).message
