"""Prometheus metrics, in base units (seconds), on a registry owned by one app instance."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# *_created series double the exposition and no dashboard of ours reads them.
if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()

# 0.5 ms .. 2 s: a Jetson answers in a few ms, an overloaded CPU box in hundreds.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("decode", "preprocess", "queue", "inference")


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_duration = Histogram(
            "anemia_request_duration_seconds",
            "End-to-end request handling time in the server.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "anemia_stage_duration_seconds",
            "Time spent per prediction stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "anemia_batch_size", "Images per backend call.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.batch_limit = Gauge(
            "anemia_batch_limit",
            "Most images per backend call, as decided at warm-up (ANEMIA_BATCHING; 1 means batching is off).",
            registry=registry,
        )
        self.queue_depth = Gauge("anemia_queue_depth", "Requests waiting for the inference thread.", registry=registry)
        self.requests_in_flight = Gauge(
            "anemia_requests_in_flight", "Prediction requests being handled.", registry=registry
        )
        self.predictions = Counter(
            "anemia_predictions_total", "Predictions returned, by label.", ["label"], registry=registry
        )
        self.errors = Counter("anemia_errors_total", "Error responses, by error code.", ["code"], registry=registry)
        self.model_info = Gauge(
            "anemia_model_info",
            "The loaded model and engine (always 1).",
            ["precision", "backend", "model_sha256"],
            registry=registry,
        )
        self.ready = Gauge("anemia_ready", "1 when the engine is loaded and warmed up.", registry=registry)
        # Pre-create label sets so dashboards show zeros rather than gaps.
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for label in ("anemic", "non-anemic"):
            self.predictions.labels(label=label)
