"""The DBOS Transact side of ``bench/compare.py``: the same three workloads on DBOS.

Imported only in a child process of ``compare.py`` (DBOS keeps process-global state: one
``DBOS`` instance, one registry), never by Tether. DBOS 3.x API, as read from the installed
package: ``DBOS(config={"name", "system_database_url", ...})`` then ``DBOS.launch()`` (which
creates and migrates the system database), ``@DBOS.workflow()`` / ``@DBOS.step()`` (sync or
``async def``), queues only through ``DBOS.register_queue(name, worker_concurrency=...,
polling_interval_sec=...)`` after the launch (``Queue(...)`` can no longer be constructed
directly), ``DBOS.destroy()``.

Workloads, each mirroring ``bench/run.py``:

* ``steps``: one workflow of ``n`` steps, each step a trivial ``x + 1`` whose result DBOS
  checkpoints; the workflow is called directly (it runs in the calling thread, or on the event
  loop for ``async``), timed from the call to its return (the final status is committed then).
* ``items``: ``n`` workflows of 3 such steps on a queue with ``worker_concurrency`` 8. The queue
  is registered with ``worker_concurrency=0`` so nothing runs while all ``n`` are enqueued (as
  ``run.py`` creates every item before its pool starts); then the limit is raised to 8 and the
  clock starts, until the system database shows all ``n`` in ``SUCCESS``.
* ``latency``: ``Queue.enqueue`` of a one-step workflow until that step's body starts, one at a
  time. DBOS queues are polled (no notification on enqueue), so each enqueue waits a random
  ``uniform(0, polling_interval)`` first: without it every sample would land at the same phase
  of the poll loop, right after a poll, and measure nearly a full interval.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from typing import Any

import sqlalchemy as sa
from dbos import DBOS

QUEUE = "bench_queue"
FIRST_STEP_AT: dict[str, float] = {}
_done = threading.Semaphore(0)


def launch(url: str) -> None:
    DBOS(config={"name": "tether-bench", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()


# -- workflows (registered at import; DBOS() picks the registry up) -----------------------------


@DBOS.step()
def inc(x: int) -> int:
    return x + 1


@DBOS.step()
async def ainc(x: int) -> int:
    return x + 1


@DBOS.workflow()
def steps_wf(n: int) -> int:
    x = 0
    for _ in range(n):
        x = inc(x)
    return x


@DBOS.workflow()
async def asteps_wf(n: int) -> int:
    x = 0
    for _ in range(n):
        x = await ainc(x)
    return x


@DBOS.workflow()
def three_wf() -> int:
    x = inc(0)
    x = inc(x)
    x = inc(x)
    _done.release()
    return x


@DBOS.workflow()
async def athree_wf() -> int:
    x = await ainc(0)
    x = await ainc(x)
    x = await ainc(x)
    _done.release()
    return x


@DBOS.step()
def mark_first(workflow_id: str) -> bool:
    FIRST_STEP_AT.setdefault(workflow_id, time.perf_counter())
    return True


@DBOS.workflow()
def latency_wf() -> bool:
    return mark_first(DBOS.workflow_id or "")


# -- measurements --------------------------------------------------------------------------------


def steps_per_second(url: str, n: int, mode: str) -> float:
    launch(url)
    try:
        t0 = time.perf_counter()
        result = asyncio.run(asteps_wf(n)) if mode == "async" else steps_wf(n)
        dt = time.perf_counter() - t0
        assert result == n, result
        return n / dt
    finally:
        DBOS.destroy()


def _succeeded() -> int:
    from dbos._dbos import _get_dbos_instance

    sys_db = _get_dbos_instance()._sys_db
    ws = sys_db.tables.workflow_status
    q = (
        sa.select(sa.func.count())
        .select_from(ws)
        .where(ws.c.status == "SUCCESS", ws.c.queue_name == QUEUE)
    )
    with sys_db.engine.connect() as conn:
        return conn.execute(q).scalar_one()


def items_per_second(url: str, n: int, concurrency: int, mode: str, poll: float) -> float:
    launch(url)
    try:
        queue = DBOS.register_queue(QUEUE, worker_concurrency=0, polling_interval_sec=poll)
        fn = athree_wf if mode == "async" else three_wf
        for _ in range(n):
            queue.enqueue(fn)  # type: ignore[arg-type]
        queue.set_worker_concurrency(concurrency)
        t0 = time.perf_counter()
        for _ in range(n):  # every workflow function has returned ...
            if not _done.acquire(timeout=600):
                raise RuntimeError("DBOS queue stalled")
        while _succeeded() < n:  # ... and its SUCCESS status has committed
            time.sleep(0.002)
        return n / (time.perf_counter() - t0)
    finally:
        DBOS.destroy()


def enqueue_latency(url: str, n: int, poll: float) -> tuple[float, float]:
    launch(url)
    try:
        queue = DBOS.register_queue(QUEUE, worker_concurrency=8, polling_interval_sec=poll)
        time.sleep(1.2)  # the queue thread looks for new queues every 1 s
        latencies: list[float] = []
        handle = None
        for _ in range(n):
            time.sleep(random.uniform(0, poll))
            t0 = time.perf_counter()
            handle = queue.enqueue(latency_wf)
            wid = handle.get_workflow_id()
            deadline = time.monotonic() + 60
            while wid not in FIRST_STEP_AT:
                if time.monotonic() > deadline:
                    raise RuntimeError("a queued workflow never started")
                time.sleep(0.0005)
            latencies.append((FIRST_STEP_AT[wid] - t0) * 1000)
        if handle is not None:
            handle.get_result()  # let the last workflow finish before the teardown
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return statistics.median(latencies), p99
    finally:
        DBOS.destroy()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    measure, url = spec["measure"], spec["url"]
    if measure == "steps":
        return {"value": steps_per_second(url, spec["steps"], spec["mode"])}
    if measure == "items":
        value = items_per_second(
            url, spec["items"], spec["concurrency"], spec["mode"], spec["poll"]
        )
        return {"value": value}
    if measure == "latency":
        p50, p99 = enqueue_latency(url, spec["samples"], spec["poll"])
        return {"p50": p50, "p99": p99}
    raise ValueError(f"unknown measure {measure!r}")
