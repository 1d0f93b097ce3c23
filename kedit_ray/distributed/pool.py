"""The one pool of model-holding workers, with one fault policy, for eval (every protocol), stats and trace.

    pool = make_pool(EditWorker, (spec,), resources)      # Ray actors, or one worker in this process
    for item, result in pool.stream(items, "run"):        # one item in flight per worker, results as they come
    results = pool.scatter(shares, "targets", applied)    # one share per worker, all back before it returns
    pool.broadcast("use_covariances", pool.put(covs))     # on every worker, and on every replacement too

Fault policy (Ray): actors are not restarted by Ray (max_restarts=0); the pool does it. A worker that dies is
replaced at once by a new actor, which loads the model and replays the broadcasts before it takes work; the item
it held goes back to the front of the queue. An item that took down MAX_DEATHS workers comes out as `Lost` (the
eval driver writes it as an error row; a scatter raises). A replacement that cannot be placed (its node is gone)
does not hold the run up: the live workers take the queue, and only when none is left and none comes up within
`place_timeout` does the run stop, its work so far saved. Workers whose model fingerprints differ are refused.
A worker that fails in its constructor fails the run with that error (a replacement would fail the same way).

Weights: the CPU workers (no GPU per worker) of a pool of more than one map one read-only copy per node where a load
would make them anew in each (distributed.shared) when resources.share_weights is on (--share-weights).
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from kedit_ray.distributed.cluster import connect
from kedit_ray.distributed.shared import WeightStore, sharing
from kedit_ray.distributed.worker import WorkerInfo, local_ref
from kedit_ray.errors import PoolError
from kedit_ray.spec import Resources

MAX_DEATHS = 2          # workers an item may take down before it is given up
PLACE_TIMEOUT = 300.0   # seconds to wait for a replacement when no worker is left
# a pool open already, lent to open_pool (`lending`): `kedit suite` runs every eval on one pool
LENDER: contextvars.ContextVar = contextvars.ContextVar("kedit_pool_lender", default=None)


@dataclass(frozen=True)
class Lost:
    """The result of an item that took down MAX_DEATHS workers."""

    message: str


@dataclass(frozen=True)
class Job:
    key: object      # counts the workers it took down
    method: str
    args: tuple
    item: object     # what the caller gets back beside the result


class WorkerStartError(PoolError):
    """A worker could not start (its constructor raised)."""


def _line(exc: BaseException) -> str:
    """The last meaningful line of a Ray error (the original exception's `Type: message`), without colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(exc).__name__


def _check_fingerprints(infos: list[WorkerInfo], expected: str | None = None) -> None:
    prints = {i.fingerprint for i in infos} | ({expected} if expected else set())
    if len(prints) > 1:
        detail = ", ".join(f"{i.name}: {i.fingerprint}" for i in infos)
        raise ValueError(f"the workers loaded different weights ({detail}{'; expected ' + expected if expected else ''}"
                         "); every node must load the same model under that name")


class LocalPool:
    """One worker in this process (workers 1, no cluster): the same calls, run in turn, no fault handling."""

    def __init__(self, worker_cls, args: tuple, resources: Resources, gpus: list):
        import torch

        self.threads = torch.get_num_threads()   # the worker sets its own; given back on close
        self.worker = worker_cls(*args, index=0, cpus=resources.cpus(), gpus=gpus)
        self.infos = [self.worker.info()]
        self.size = 1

    def put(self, obj):
        return local_ref(obj)

    def stream(self, items: Iterable, method: str, *args) -> Iterator[tuple[object, object]]:
        for item in items:
            yield item, getattr(self.worker, method)(item, *args)

    def scatter(self, shares: list, method: str, *args) -> list:
        return [getattr(self.worker, method)(share, *args) for share in shares]

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)

    def broadcast(self, method: str, *args) -> None:
        getattr(self.worker, method)(*args)

    def forget(self) -> None:
        """(RayPool: drop the broadcasts a replacement replays; one worker in this process has none to keep.)"""

    def each(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]

    def generate(self, method: str, *args) -> Iterator:
        return getattr(self.worker, method)(*args)

    def close(self) -> None:
        import torch

        self.worker = None
        torch.set_num_threads(self.threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayPool:
    """`size` Ray actors of `worker_cls(*args)`; see the module docstring for the fault policy."""

    def __init__(self, worker_cls, args: tuple, resources: Resources, size: int, expected: str | None = None,
                 place_timeout: float = PLACE_TIMEOUT):
        share = resources.share_weights and resources.gpus_per_worker == 0 and size > 1
        self.store = ray.remote(WeightStore).options(num_cpus=0).remote() if share else None
        self.remote = ray.remote(sharing(worker_cls) if share else worker_cls)
        self.args, self.size, self.expected, self.place_timeout = args, size, expected, place_timeout
        self.cpus = resources.cpus()
        self.options = dict(num_cpus=self.cpus, num_gpus=resources.gpus_per_worker, max_restarts=0,
                            max_task_retries=0)
        self.setup: list[tuple[str, tuple]] = []       # broadcasts, replayed on every replacement
        self.index: dict = {}                          # actor -> worker index
        self.starting: dict = {}                       # ready ref (its info) -> actor
        self.idle: list = []
        self.info: dict = {}                           # actor -> WorkerInfo
        self.replaced = 0
        try:
            for i in range(size):
                self._spawn(i)
            deadline = time.monotonic() + place_timeout   # then go on with the workers there are (the rest join
            while self.starting:                          # when placed), or stop if there are none
                left = deadline - time.monotonic()
                if left <= 0 and self.info:
                    break
                if left <= 0:
                    raise PoolError(f"none of {size} workers could be placed within {place_timeout:g} s")
                self._wait_started(min(left, 5.0))
            _check_fingerprints(self.infos, expected)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ workers coming and going

    def _spawn(self, index: int) -> None:
        shared = {"store": self.store} if self.store is not None else {}
        actor = self.remote.options(**self.options).remote(*self.args, index=index, cpus=self.cpus, **shared)
        self.index[actor] = index
        self.starting[actor.info.remote()] = actor

    def _lose(self, actor) -> None:
        """`actor` died: forget it and start its replacement."""
        index = self.index.pop(actor)
        self.info.pop(actor, None)
        if actor in self.idle:
            self.idle.remove(actor)
        ray.kill(actor, no_restart=True)
        self.replaced += 1
        self._spawn(index)

    def _started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
            ray.get([getattr(actor, m).remote(*a) for m, a in self.setup])
        except RayActorError as exc:
            if exc.actor_init_failed:
                raise WorkerStartError(f"a worker could not start: {_line(exc)}") from None
            self._lose(actor)
            return
        known = self.infos
        _check_fingerprints([*known, info], self.expected or (known[0].fingerprint if known else None))
        self.info[actor] = info
        self.idle.append(actor)

    def _wait_started(self, timeout: float | None) -> bool:
        ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=timeout)
        for ref in ready:
            self._started(ref)
        return bool(ready)

    @property
    def infos(self) -> list[WorkerInfo]:
        return list(self.info.values())

    # ------------------------------------------------------------------ work

    def put(self, obj):
        return ray.put(obj)

    def _run(self, jobs: Iterable[Job]) -> Iterator[tuple[object, object]]:
        """(job item, result or Lost) for every job, in the order they finish; one job in flight per worker."""
        source, queue = iter(jobs), deque()
        inflight: dict = {}                # task ref -> (actor, job)
        deaths: Counter = Counter()
        exhausted, alone_since = False, None
        while True:
            while self.idle and not (exhausted and not queue):
                if not queue:
                    job = next(source, None)
                    if job is None:
                        exhausted = True
                        break
                    queue.append(job)
                actor, job = self.idle.pop(), queue.popleft()
                inflight[getattr(actor, job.method).remote(*job.args)] = (actor, job)
            if not inflight and exhausted and not queue:
                return
            if not inflight and not self.idle:     # every worker lost: wait for a replacement to come up
                alone_since = alone_since or time.monotonic()
                left = self.place_timeout - (time.monotonic() - alone_since)
                if left <= 0:
                    raise PoolError(f"no worker left, and none could be placed within {self.place_timeout:g} s; "
                                    "the work done so far is saved: rerun the same command to resume")
                self._wait_started(min(left, 5.0))
                continue
            alone_since = None
            ready, _ = ray.wait([*inflight, *self.starting], num_returns=1)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                    continue
                actor, job = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as exc:
                    self._lose(actor)
                    deaths[job.key] += 1
                    if deaths[job.key] < MAX_DEATHS:
                        queue.appendleft(job)
                        continue
                    result = Lost(f"took down {MAX_DEATHS} workers: {_line(exc)}")
                else:
                    self.idle.append(actor)
                yield job.item, result

    def stream(self, items: Iterable, method: str, *args) -> Iterator[tuple[object, object]]:
        """(item, `method(item, *args)` or Lost) for every item, in the order they finish; `items` is read as
        workers free up. Read it to the end (or close the pool): a worker busy with an item not yet read back
        takes no more work."""
        return self._run(Job(i, method, (item, *args), item) for i, item in enumerate(items))

    def scatter(self, shares: list, method: str, *args) -> list:
        """[`method(share, *args)` for each share], all finished (a barrier); a lost share reruns elsewhere."""
        out = dict(self._run(Job(i, method, (share, *args), i) for i, share in enumerate(shares)))
        if lost := [r.message for r in out.values() if isinstance(r, Lost)]:
            raise PoolError(f"a share of {method} {lost[0]}")
        return [out[i] for i in range(len(shares))]

    def call(self, method: str, *args):
        """`method(*args)` on one worker (another if it dies)."""
        [(_, result)] = list(self._run([Job(0, method, args, None)]))
        if isinstance(result, Lost):
            raise PoolError(f"{method} {result.message}")
        return result

    def broadcast(self, method: str, *args) -> None:
        """`method(*args)` on every worker now, and on every replacement before it takes work."""
        self.setup.append((method, args))
        self.each(method, *args)

    def forget(self) -> None:
        """Drop the broadcasts so far: a replacement starts from its model alone (a suite's next run)."""
        self.setup.clear()

    def each(self, method: str, *args) -> list:
        """[`method(*args)`] from every idle worker now (a worker lost meanwhile gives nothing)."""
        actors = list(self.idle)
        out = []
        for actor, ref in [(a, getattr(a, method).remote(*args)) for a in actors]:
            try:
                out.append(ray.get(ref))
            except RayActorError:
                self._lose(actor)
        return out

    def generate(self, method: str, *args) -> Iterator:
        """The values a generator method yields, run on one worker; if that worker dies, the generator starts
        over on another (MAX_DEATHS times at most), so a caller must skip what it already has."""
        for attempt in range(MAX_DEATHS):
            while not self.idle:
                self._wait_started(None)
            actor = self.idle.pop()
            try:
                for ref in getattr(actor, method).options(num_returns="streaming").remote(*args):
                    yield ray.get(ref)
            except RayActorError as exc:
                self._lose(actor)
                if attempt + 1 == MAX_DEATHS:
                    raise PoolError(f"{method} took down {MAX_DEATHS} workers: {_line(exc)}") from None
                continue
            except RayTaskError as exc:      # it raised: the run stops, the worker serves the next one (a suite's)
                self.idle.append(actor)
                raise PoolError(f"{method} raised on a worker: {_line(exc)}; the work finished so far is saved "
                                "(--debug shows the worker's traceback)") from exc
            self.idle.append(actor)
            return

    def close(self) -> None:
        for actor in [*self.index, *self.starting.values()]:
            ray.kill(actor, no_restart=True)
        if self.store is not None:   # after the workers: its copies go with it
            ray.kill(self.store, no_restart=True)
        self.index, self.starting, self.idle, self.store = {}, {}, [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def open_pool(worker_cls, args: tuple, resources: Resources, size: int | None = None,
              expected: str | None = None) -> Iterator[LocalPool | RayPool]:
    """`size` (default resources.workers, never more) workers of `worker_cls(*args, index=, cpus=, gpus=)`: one
    in this process when resources.in_process, else Ray actors (Ray joined or started by cluster.connect, and
    checked to hold them). `expected`: the fingerprint every worker must report. Inside `lending(lender)`,
    `lender.lend(worker_cls, args, resources)` comes first: a context manager yielding a pool already open, or None
    for a pool it does not serve."""
    lender = LENDER.get()
    lent = lender.lend(worker_cls, args, resources) if lender is not None else None
    if lent is not None:
        with lent as pool:
            _check_fingerprints(pool.infos, expected)
            yield pool
        return
    size = min(size or resources.workers, resources.workers)
    if resources.in_process:
        import torch

        gpus = list(range(torch.cuda.device_count())) if resources.gpus_per_worker > 0 else []
        with LocalPool(worker_cls, args, resources, gpus) as pool:
            _check_fingerprints(pool.infos, expected)
            _say(pool.infos)
            yield pool
        return
    resources = replace(resources, workers=size)
    with connect(resources), RayPool(worker_cls, args, resources, size, expected) as pool:
        _say(pool.infos)
        yield pool


@contextlib.contextmanager
def lending(lender) -> Iterator[None]:
    """While inside, open_pool asks `lender` for its pool first (see open_pool)."""
    token = LENDER.set(lender)
    try:
        yield
    finally:
        LENDER.reset(token)


def _say(infos: list[WorkerInfo]) -> None:
    where = "; ".join(f"{i.name} on {i.device}, {i.threads} thread{'s' * (i.threads > 1)}" for i in infos)
    print(f"[kedit] {len(infos)} worker{'s' * (len(infos) > 1)}: {where}", file=sys.stderr, flush=True)
