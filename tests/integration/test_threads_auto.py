"""`engine.threads: auto` inside Ray: one torch thread per CPU reserved for the actor or task."""

from __future__ import annotations

from cai_ray.config import EngineConfig
from cai_ray.engines import resolve_threads


def test_threads_auto_is_the_reserved_cpus(ray_cluster):
    ray = ray_cluster

    @ray.remote
    def threads() -> int:
        return resolve_threads(EngineConfig().threads)

    assert ray.get(threads.options(num_cpus=1).remote(), timeout=120) == 1
    assert ray.get(threads.options(num_cpus=0.5).remote(), timeout=120) == 1  # at least one
    assert ray.get(threads.options(num_cpus=2).remote(), timeout=120) == 2
    assert ray.get(threads.options(num_cpus=0).remote(), timeout=120) == 1
