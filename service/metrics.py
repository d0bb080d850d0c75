"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

Every verdict goes through ``Metrics.verdict`` (/score, V2 and the sidecar alike): the verdict
counters, the score histogram, the OOD rate, the drift window (drift.py) and the request's
own tally (``request_verdicts``, read by app.py's access log).
"""

from __future__ import annotations

import math
from collections import deque
from contextvars import ContextVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
)

from hopgate.bundle import BundleMeta

from .config import Settings
from .drift import Drift

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
# the reason label of hopgate_requests_total (errors.ServingError.reason), as docs/serving.md
REASONS = ("ok", "queue_full", "overloaded", "deadline", "bad_input", "unauthorized",
           "not_found", "method_not_allowed", "shutdown", "ood", "upstream", "internal")

# the verdicts (ood?) of the request being served: app.py's envelope sets a fresh list per
# request, so the access log can carry them (a context variable: no request object needed)
request_verdicts: ContextVar[list[bool] | None] = ContextVar("request_verdicts", default=None)


class Metrics:
    def __init__(self, buckets: list[int], score_buckets: list[float], ood_window: int = 1000,
                 reference: list[float] | None = None, drift_window: int = 1000,
                 drift_every: int = 50):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        GCCollector(registry=r)  # python_gc_collections_total{generation} (server/memory.py)
        self.requests = Counter("hopgate_requests", "Requests by HTTP status and reason",
                                ["status", "reason"], registry=r)
        self.images = Counter("hopgate_images", "Scored images by verdict (id, ood, error)",
                              ["verdict"], registry=r)
        self.request_seconds = Histogram("hopgate_request_seconds", "Request latency",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("hopgate_queue_wait_seconds",
                                    "Time an image waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("hopgate_compute_seconds", "onnxruntime time per batch",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("hopgate_batch_size", "Images per batch (before padding)",
                                    buckets=[float(b) for b in sorted(set(buckets))], registry=r)
        self.score = Histogram("hopgate_score", "Score of scored images (watch it drift)",
                               buckets=score_buckets, registry=r)
        self.queue_depth = Gauge("hopgate_queue_depth", "Images waiting in the queue", registry=r)
        self.inflight = Gauge("hopgate_inflight_images", "Images being computed", registry=r)
        self.ood_rate = Gauge("hopgate_ood_rate", f"Share of OOD verdicts among the last "
                              f"{ood_window} images", registry=r)
        self.model = Info("hopgate_model", "The loaded bundle", registry=r)
        self.reloads = Counter("hopgate_reloads", "Hot reloads built, by outcome (loaded, "
                               "failed); triggers that come together share one", ["outcome"],
                               registry=r)
        self._verdicts: deque[bool] = deque(maxlen=ood_window)
        # per image only appends and increments: the share is computed when scraped
        self.ood_rate.set_function(lambda: sum(self._verdicts) / max(len(self._verdicts), 1))
        self._by_verdict = {True: self.images.labels("ood"), False: self.images.labels("id")}
        # drift against the calibration table (``reference``: the bundle's score_quantiles)
        self.drift = Drift(reference, drift_window, drift_every) if reference else None
        self.drift_psi = Gauge("hopgate_score_drift_psi", f"PSI of the last {drift_window} "
                               "scores against the bundle's calibration scores", registry=r)
        self.drift_ks = Gauge("hopgate_score_drift_ks", f"KS statistic of the last {drift_window}"
                              " scores against the bundle's calibration scores", registry=r)
        self.drift_psi.set_function(lambda: self.drift.psi if self.drift else math.nan)
        self.drift_ks.set_function(lambda: self.drift.ks if self.drift else math.nan)

    @classmethod
    def for_bundle(cls, settings: Settings, meta: BundleMeta) -> Metrics:
        """The metrics of a server of ``meta``: histogram edges and drift reference from its
        calibration table."""
        return cls(settings.buckets, cls.score_buckets(meta.score_quantiles, meta.threshold),
                   reference=meta.score_quantiles, drift_window=settings.drift_window,
                   drift_every=settings.drift_every)

    @staticmethod
    def score_buckets(quantiles: list[float], threshold: float) -> list[float]:
        """Score histogram edges from the bundle's ID calibration table (every 5 %), plus the
        threshold and a tail below it: drift shows up as mass moving between these edges."""
        n = len(quantiles)
        edges = {round(quantiles[min(int(i * n / 20), n - 1)], 3) for i in range(21)}
        spread = (quantiles[-1] - quantiles[0]) or 1.0
        edges |= {round(threshold, 3)}
        edges |= {round(threshold - k * spread / 4, 3) for k in (1, 2, 4, 8)}
        return sorted(edges)

    def verdict(self, ood: bool, score: float) -> None:
        self._by_verdict[ood].inc()
        self.score.observe(score)
        self._verdicts.append(ood)
        if self.drift is not None:
            self.drift.observe(score)
        tally = request_verdicts.get()
        if tally is not None:
            tally.append(ood)
