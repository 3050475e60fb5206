"""Prometheus metrics: jobs by state, job duration, queue depth (read from the store and the
broker at scrape time, so every API replica reports the same), upload bytes, and what tenants
hold of this API process (streams, uploads being received, job reservations) with the refusals
at their per-tenant limits."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("clcalib.service")
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf"))


class _JobCollector:
    def __init__(self, store, broker, storage=None):
        self.store, self.broker, self.storage = store, broker, storage

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("clcalib_jobs", "jobs in the store by state", labels=["state"])
        for state, n in self.store.counts_by_state().items():
            g.add_metric([state], n)
        yield g
        durations = self.store.durations()
        counts = [sum(1 for d in durations if d <= b) for b in BUCKETS]
        yield HistogramMetricFamily(
            "clcalib_job_duration_seconds", "first start to finish of succeeded and failed jobs",
            buckets=[(str(b) if b != float("inf") else "+Inf", c) for b, c in zip(BUCKETS, counts, strict=True)],
            sum_value=sum(durations),
        )
        q = GaugeMetricFamily("clcalib_queue_depth", "messages waiting in the broker queue")
        try:
            q.add_metric([], self.broker.depth())
        except Exception as e:  # scraping must not fail because the broker is down
            log.warning("queue depth unavailable: %s", e)
            q.add_metric([], float("nan"))
        yield q
        if self.storage is not None:
            d = GaugeMetricFamily("clcalib_data_free_bytes", "free bytes on the data disk (uploads keep a reserve)")
            d.add_metric([], self.storage.free_bytes())
            yield d


class _TenantLimitCollector:
    def __init__(self, limits):
        self.limits = limits

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("clcalib_tenant_held", "held by all tenants in this API process: open event streams, "
                              "upload bodies being received, active-job reservations of submits in flight",
                              labels=["kind"])
        totals = {"streams": 0, "uploads": 0, "job_reservations": 0, **self.limits.totals()}
        for kind, n in sorted(totals.items()):
            g.add_metric([kind], n)
        yield g
        c = CounterMetricFamily("clcalib_tenant_limit_refusals", "requests answered 429 at a per-tenant limit "
                                "in this API process", labels=["limit"])
        for limit, n in sorted(self.limits.refused.items()):
            c.add_metric([limit], n)
        yield c


class Metrics:
    def __init__(self, store, broker, storage=None):
        self.registry = CollectorRegistry()
        self.upload_bytes = Counter("clcalib_upload_bytes", "bytes received in job uploads",
                                    registry=self.registry)
        self.registry.register(_JobCollector(store, broker, storage))

    def watch(self, limits) -> None:
        """Report a ``service.connections.TenantLimits``."""
        self.registry.register(_TenantLimitCollector(limits))
