"""RolePool: N long-lived actors of one RL role, called with timeouts, restarted when killed.

`submit(call, items)` splits `items` into contiguous shares, one per worker, and returns a
pending result whose `result()` gives the outputs in item order. A worker that dies mid-call is
restarted by Ray (`max_restarts`); the pool waits until it answers again, runs `on_restart`
(the RL loop loads the current weights into a new rollout worker) and sends the same share
again, so no item is lost or answered twice. Size 0 runs one worker in the driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from actors.learner.group import LocalHandle
from cai_ray.errors import CaiRayError, find_user_error

log = logging.getLogger(__name__)

Call = Callable[[Any, list], Any]  # (handle, share) -> ObjectRef (or a value in-process)


class RolePool:
    """Workers of `cls(*args, **kwargs)`; see the module docstring."""

    def __init__(
        self,
        name: str,
        cls: type,
        *args: Any,
        size: int,
        num_cpus: float,
        num_gpus: float,
        max_restarts: int,
        timeout_s: float,
        scheduling: Sequence[Any] | None = None,
        **kwargs: Any,
    ):
        self.name = name
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.on_restart: Callable[[Any], None] | None = None
        self._local = size == 0
        if self._local:
            self.handles = [LocalHandle(cls(*args, **kwargs))]
            return
        import ray

        remote = ray.remote(cls)
        self.handles = [
            remote.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=max_restarts,
                max_task_retries=0,  # the pool resends a lost share itself, after on_restart
                scheduling_strategy=scheduling[i] if scheduling else None,
            ).remote(*args, **kwargs)
            for i in range(size)
        ]

    def __len__(self) -> int:
        return len(self.handles)

    def submit(self, call: Call, items: Sequence[Any]) -> PendingMap:
        """Send each worker its share of `items` now; `.result()` collects them in order."""
        n = len(self.handles)
        per = -(-len(items) // n) if items else 0
        shares = [list(items[i * per : (i + 1) * per]) for i in range(n)]
        return PendingMap(self, call, shares)

    def map(self, call: Call, items: Sequence[Any]) -> list[Any]:
        return self.submit(call, items).result()

    def broadcast(self, call: Call) -> list[Any]:
        """`call(handle, [])` on every worker; one result per worker."""
        return self.submit_all(call).result()

    def submit_all(self, call: Call) -> PendingMap:
        """`call(handle, [])` on every worker, not waited for yet."""
        return PendingMap(self, call, [[] for _ in self.handles], flatten=False)

    def ready(self, timeout_s: float) -> list[int]:
        """Wait (up to `timeout_s`) until every worker has loaded its model; their pids."""
        patient = PendingMap(self, lambda h, _: h.pid.remote(), [[] for _ in self.handles],
                             flatten=False, timeout_s=timeout_s)  # fmt: skip
        return patient.result()

    def pids(self) -> list[int]:
        return self.broadcast(lambda h, _: h.pid.remote())

    def shutdown(self) -> None:
        handles, self.handles = self.handles, []
        if self._local:
            return
        import ray

        for h in handles:
            ray.kill(h, no_restart=True)

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, ref: Any, *, what: str, timeout_s: float | None = None) -> Any:
        if self._local:
            return ref
        import ray
        from ray.exceptions import GetTimeoutError

        timeout = timeout_s or self.timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise CaiRayError(
                f"{self.name} worker did not answer {what} within {timeout:g} s",
                hint="raise rl_train.call_timeout_s for slow models, or check the worker's logs",
            ) from None

    def _revive(self, worker: int, reason: str) -> None:
        """Wait for Ray to restart a dead worker, then re-run `on_restart` on it."""
        from ray.exceptions import RayActorError

        self.restarts += 1
        if self.restarts > self.max_restarts * len(self.handles):
            raise CaiRayError(
                f"{self.name} worker {worker} died and the restart budget is spent ({reason})",
                where=f"rl_train.{self.name}.max_restarts",
                hint="check the worker's logs (memory, GPU), or raise max_restarts",
            )
        log.warning("%s worker %d died (%s); restarting it", self.name, worker, reason)
        deadline = time.monotonic() + self.timeout_s
        handle = self.handles[worker]
        while True:
            try:
                self._wait(handle.pid.remote(), what="after a restart")
                break
            except RayActorError:
                if time.monotonic() > deadline:
                    raise CaiRayError(
                        f"{self.name} worker {worker} did not come back within "
                        f"{self.timeout_s:g} s",
                        hint="check `ray status` for free resources",
                    ) from None
                time.sleep(0.5)
        if self.on_restart is not None:
            self.on_restart(handle)


class PendingMap:
    """Shares already sent to the workers; `result()` waits, resending a dead worker's share."""

    def __init__(
        self,
        pool: RolePool,
        call: Call,
        shares: list[list],
        *,
        flatten: bool = True,
        timeout_s: float | None = None,
    ):
        self.pool, self.call, self.shares, self.flatten = pool, call, shares, flatten
        self.timeout_s = timeout_s
        self.refs: list[Any] = [None] * len(shares)
        self.errors: list[BaseException | None] = [None] * len(shares)
        for i, share in enumerate(shares):
            self._send(i, share)

    def _send(self, i: int, share: list) -> None:
        if self.flatten and not share:
            self.refs[i] = []
            return
        try:
            self.refs[i] = self.call(self.pool.handles[i], share)
        except Exception as exc:  # in-process workers raise right here: keep it for result()
            self.errors[i] = exc

    def result(self) -> list[Any]:
        from ray.exceptions import RayActorError, RayTaskError

        out: list[Any] = []
        for i, share in enumerate(self.shares):
            while True:
                if self.errors[i] is not None:
                    raise self.errors[i]  # type: ignore[misc]
                if self.flatten and not share:
                    value = []
                    break
                try:
                    what = f"a batch of {len(share)}" if share else "a call"
                    value = self.pool._wait(self.refs[i], what=what, timeout_s=self.timeout_s)
                    break
                except RayActorError as exc:
                    self.pool._revive(i, str(exc).splitlines()[0] if str(exc) else "died")
                    self._send(i, share)
                except RayTaskError as exc:
                    user = find_user_error(exc)
                    raise user or CaiRayError(
                        f"{self.pool.name} worker failed: {exc.cause!r}"
                    ) from None
            if self.flatten:
                out.extend(value)
            else:
                out.append(value)
        return out
