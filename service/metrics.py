"""Prometheus metrics, on a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
# the reason label of hopgate_requests_total (errors.ServingError.reason), as docs/serving.md
REASONS = ("ok", "queue_full", "deadline", "bad_input", "unauthorized", "not_found",
           "method_not_allowed", "shutdown", "internal")


class Metrics:
    def __init__(self, buckets: list[int], score_buckets: list[float], ood_window: int = 1000):
        r = self.registry = CollectorRegistry()
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
        self._verdicts: deque[bool] = deque(maxlen=ood_window)

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
        self.images.labels("ood" if ood else "id").inc()
        self.score.observe(score)
        self._verdicts.append(ood)
        self.ood_rate.set(sum(self._verdicts) / len(self._verdicts))
