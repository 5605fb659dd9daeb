"""``GET /metrics``: Prometheus metrics, computed from the ledger at scrape time (no token).

The ledger is shared by every gateway, worker and scheduler process, so whichever gateway is
scraped reports the whole deployment, and the numbers agree across processes and restarts.
The "counters" are history counts (events, waits, inbox and outbox rows): they only go down
when ``tether db prune`` deletes old work, which Prometheus reads as a counter reset.

* ``tether_work{state}`` — work items by state (gauge);
* ``tether_leases_expired`` — running items past their lease expiry, not yet reaped (gauge);
* ``tether_claims_total`` — claims (``claimed`` events);
* ``tether_lease_expiries_total`` — ``lease_expired`` events (the reaper re-queued the item);
* ``tether_wait_resolutions_total{kind,state}`` — waits no longer pending;
* ``tether_inbound_messages_total{channel,disposition}`` — inbound chat messages;
* ``tether_outbound_messages_total{channel,state}`` — outbound messages by delivery state;
* ``tether_step_duration_seconds{status}`` — durations of the steps finished in the last
  10 minutes (waits excluded). A *gauge histogram*: it describes a sliding window, so bucket
  counts go down as steps age out, which a (counter) histogram may not do. Read it with
  ``histogram_quantile(0.99, tether_step_duration_seconds_bucket)`` directly, without
  ``rate()``. In the OpenMetrics format (``Accept: application/openmetrics-text``) it is typed
  ``gaugehistogram``; the classic text format has no such type and calls it ``histogram``;
* ``tether_ledger_up`` — 1 if the ledger answered this scrape, else 0 (and the ledger metrics
  are left out, while the process metrics are still served);
* the default ``process_*``, ``python_*`` and ``python_gc_*`` collectors.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (nothing global). Imports
ledger and the gateway's own modules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gateway.api import LEDGER_KEY
from ledger import LedgerUnavailable, WorkState
from ledger.observability import STEP_BUCKETS, LedgerMetrics

log = logging.getLogger(__name__)

#: a scrape gives up on the ledger after this long (and reports tether_ledger_up 0)
SCRAPE_TIMEOUT = 5.0

_STATES = tuple(s.value for s in WorkState)
_DB_DOWN = (LedgerUnavailable, OperationalError, DBAPIError, PoolTimeout, OSError, TimeoutError)


class LedgerCollector(Collector):
    """Turns the snapshot the scrape just read into metric families.

    ``collect`` is synchronous (prometheus-client calls it while rendering), so the handler
    reads the ledger first and hands the snapshot over with :meth:`render`; there is no await
    between the two, so concurrent scrapes cannot see each other's snapshot."""

    def __init__(self) -> None:
        self._snapshot: LedgerMetrics | None = None
        self._up = False

    def render(
        self,
        registry: CollectorRegistry,
        snapshot: LedgerMetrics | None,
        encoder: Callable[[CollectorRegistry], bytes],
    ) -> bytes:
        self._snapshot, self._up = snapshot, snapshot is not None
        try:
            return encoder(registry)
        finally:
            self._snapshot = None

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tether_ledger_up", "1 if the ledger answered this scrape.")
        up.add_metric([], 1.0 if self._up else 0.0)
        yield up
        snap = self._snapshot
        if snap is None:
            return

        work = GaugeMetricFamily("tether_work", "Work items by state.", labels=["state"])
        for state in sorted({*_STATES, *snap.work_by_state}):
            work.add_metric([state], snap.work_by_state.get(state, 0))
        yield work

        expired = GaugeMetricFamily(
            "tether_leases_expired", "Running work items past their lease expiry, not yet reaped."
        )
        expired.add_metric([], snap.leases_expired)
        yield expired

        claims = CounterMetricFamily("tether_claims", "Work items claimed by workers.")
        claims.add_metric([], snap.claims)
        yield claims

        expiries = CounterMetricFamily(
            "tether_lease_expiries", "Leases that expired and were taken back by the reaper."
        )
        expiries.add_metric([], snap.lease_expiries)
        yield expiries

        waits = CounterMetricFamily(
            "tether_wait_resolutions",
            "Waits that ended, by kind and how (resolved, timed_out, cancelled).",
            labels=["kind", "state"],
        )
        for (kind, state), n in sorted(snap.wait_resolutions.items()):
            waits.add_metric([kind, state], n)
        yield waits

        inbound = CounterMetricFamily(
            "tether_inbound_messages",
            "Inbound chat messages by channel and what became of them.",
            labels=["channel", "disposition"],
        )
        for (channel, disposition), n in sorted(snap.inbound.items()):
            inbound.add_metric([channel, disposition], n)
        yield inbound

        outbound = CounterMetricFamily(
            "tether_outbound_messages",
            "Outbound messages by channel and delivery state.",
            labels=["channel", "state"],
        )
        for (channel, state), n in sorted(snap.outbound.items()):
            outbound.add_metric([channel, state], n)
        yield outbound

        minutes = snap.window.total_seconds() / 60
        steps = GaugeHistogramMetricFamily(
            "tether_step_duration_seconds",
            f"Durations of the steps finished in the last {minutes:g} minutes (waits excluded).",
            labels=["status"],
        )
        bounds = [floatToGoString(b) for b in STEP_BUCKETS] + ["+Inf"]
        for status, hist in sorted(snap.step_durations.items()):
            steps.add_metric(
                [status],
                list(zip(bounds, (float(n) for n in hist.buckets), strict=True)),
                hist.total,
            )
        yield steps


METRICS_KEY = web.AppKey("tether.metrics", tuple)


def new_registry() -> tuple[CollectorRegistry, LedgerCollector]:
    """A registry with the ledger collector and the default process/platform/GC collectors."""
    registry = CollectorRegistry(auto_describe=False)
    collector = LedgerCollector()
    registry.register(collector)
    # Each registers itself on the registry it is given (never the global one).
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry, collector


async def metrics(request: web.Request) -> web.Response:
    registry, collector = request.app[METRICS_KEY]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    snapshot: LedgerMetrics | None = None
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            snapshot = await request.app[LEDGER_KEY].metrics_snapshot()
    except asyncio.CancelledError:
        raise
    except _DB_DOWN as exc:
        log.warning("metrics: ledger unavailable: %s: %s", type(exc).__name__, exc)
    body = collector.render(registry, snapshot, encoder)
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup_metrics(app: web.Application) -> None:
    """Add ``GET /metrics`` (no token: it names no work, input or credential)."""
    app[METRICS_KEY] = new_registry()
    app.router.add_get("/metrics", metrics)
