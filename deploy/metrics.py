"""Prometheus metrics, with the names fixed by docs/design.md, "Metrics" (dashboards and alerts use them)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from deploy.index_budget import Upkeep


class Metrics:
    """All of the daemon's metrics on one private registry (so tests can make several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records_consumed = Counter("tailord_records_consumed", "Kafka records consumed", ["topic"], registry=r)
        self.records_rejected = Counter("tailord_records_rejected", "records sent to the DLQ", ["reason"], registry=r)
        self.images_trained = Counter("tailord_images_trained", "stream images trained on", registry=r)
        self.steps_skipped = Counter("tailord_steps_skipped", "steps skipped for a non-finite loss", registry=r)
        self.train_step_seconds = Histogram(
            "tailord_train_step_seconds", "seconds per training step", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.images_per_second = Gauge("tailord_images_per_second", "training throughput (EMA)", registry=r)
        self.ssl_loss = Gauge("tailord_ssl_loss", "self-supervised loss of the last step", registry=r)
        self.regularizer_penalty = Gauge("tailord_regularizer_penalty", "regularizer penalty of the last step", registry=r)
        self.replay_buffer_images = Gauge("tailord_replay_buffer_images", "images in the replay buffer", registry=r)
        self.index_vectors = Gauge("tailord_index_vectors", "vectors in the FAISS index", ["encoder_version"], registry=r)
        self.experience = Gauge("tailord_experience", "current experience number", registry=r)
        self.experience_boundaries = Counter(
            "tailord_experience_boundaries", "experience ends by what ended them (header, count, drift)", ["reason"],
            registry=r)
        self.drift_statistic = Gauge(
            "tailord_drift_statistic", "drift detector z-score of the last check (window vs reference MMD)", registry=r)
        self.consumer_lag = Gauge("tailord_consumer_lag", "records behind the end of the topic", ["partition"], registry=r)
        self.checkpoint_seconds = Histogram(
            "tailord_checkpoint_seconds", "seconds to write a checkpoint", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.last_checkpoint_timestamp = Gauge(
            "tailord_last_checkpoint_timestamp_seconds", "unix time of the last checkpoint", registry=r)
        self.checkpoint_errors = Counter("tailord_checkpoint_errors", "checkpoints that failed to write", ["reason"], registry=r)
        self.knn_accuracy = Gauge("tailord_knn_accuracy", "kNN accuracy on a probe set", ["probe_experience"], registry=r)
        self.linear_probe_accuracy = Gauge(
            "tailord_linear_probe_accuracy", "cross-validated linear-probe accuracy on a probe set",
            ["probe_experience"], registry=r)
        self.knn_baseline_accuracy = Gauge(
            "tailord_knn_baseline_accuracy", "kNN accuracy of a floor (raw pixels, untrained encoder) on a probe set",
            ["probe_experience", "baseline"], registry=r)
        self.linear_baseline_accuracy = Gauge(
            "tailord_linear_baseline_accuracy", "linear-probe accuracy of a floor on a probe set",
            ["probe_experience", "baseline"], registry=r)
        self.probe_chance_accuracy = Gauge(
            "tailord_probe_chance_accuracy", "accuracy of guessing a probe set's most frequent class",
            ["probe_experience"], registry=r)
        self.evaluations_pending = Gauge(
            "tailord_evaluations_pending", "experience ends whose row of R is not scored yet", registry=r)
        self.evaluation_seconds = Counter(
            "tailord_evaluation_seconds", "seconds the evaluator spent scoring experience ends", registry=r)
        self.probe_ssl_loss = Gauge("tailord_probe_ssl_loss", "SSL loss on a probe set", ["probe_experience"], registry=r)
        self.representation_drift_cka = Gauge(
            "tailord_representation_drift_cka", "linear CKA of probe features now vs at their experience's end",
            ["probe_experience"], registry=r)
        self.average_accuracy = Gauge("tailord_average_accuracy", "ACC: mean kNN accuracy over probe sets", registry=r)
        self.average_forgetting = Gauge("tailord_average_forgetting", "average forgetting over earlier probe sets", registry=r)
        self.backward_transfer = Gauge("tailord_backward_transfer", "backward transfer (BWT)", registry=r)
        self.snapshot_requests = Counter("tailord_snapshot_requests", "snapshot requests", ["strategy", "outcome"], registry=r)
        self.snapshot_seconds = Histogram(
            "tailord_snapshot_seconds", "seconds to build a snapshot", registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.state_dir_bytes = Gauge("tailord_state_dir_bytes", "disk used by the state dir", registry=r)
        self.broker_up = Gauge("tailord_broker_up", "1 when the broker answered recently", registry=r)
        self.index_upkeep = IndexUpkeepCollector()  # zeros until `watch_index`
        r.register(self.index_upkeep)

    def watch_index(self, read: Callable[[], Upkeep]) -> None:
        """Export the index's freshness and upkeep cost, read from the indexer at every scrape."""
        self.index_upkeep.read = read

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class IndexUpkeepCollector:
    """The indexer's freshness and compute, as of the scrape (docs/design.md, "Index upkeep")."""

    def __init__(self, read: Callable[[], Upkeep] | None = None) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        upkeep = self.read() if self.read is not None else Upkeep()
        seconds = CounterMetricFamily("tailord_indexer_seconds", "seconds the indexer spent embedding, by kind",
                                      labels=["kind"])
        for kind, value in upkeep.seconds.items():
            seconds.add_metric([kind], value)
        yield seconds
        yield GaugeMetricFamily("tailord_indexer_compute_share",
                                "indexer embedding seconds charged over training step seconds", value=upkeep.share)
        yield GaugeMetricFamily("tailord_index_versions_behind",
                                "newest experience checkpoint minus the live index's encoder version",
                                value=upkeep.versions_behind)
        yield GaugeMetricFamily("tailord_index_stale_seconds",
                                "seconds since a checkpoint newer than the live index exists (0: current)",
                                value=upkeep.stale_seconds)
        yield GaugeMetricFamily("tailord_index_unindexed_samples",
                                "stored samples waiting to be embedded into the live index", value=upkeep.unindexed)
        yield GaugeMetricFamily("tailord_index_refresh_progress",
                                "share of the store re-embedded by the refresh under way (1: none)",
                                value=upkeep.refresh_progress)


class Throughput:
    """Images per second over a sliding window of steps, and this process's totals for the `stopped` line."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()
        self.value = 0.0
        self.images_stepped = 0  # stream + replay images through the step, this process
        self.first_at: float | None = None  # when the first step of this process ended
        self.last_at: float | None = None
        self.input_wait = 0.0  # seconds the loop waited for the prefetcher between the first and last step
        self.step_seconds = 0.0  # seconds inside the train step after the first step; the rest is the loop's

    def elapsed(self) -> float:
        """Seconds from the end of the first step to the end of the last (0 before two steps)."""
        return (self.last_at - self.first_at) if self.first_at is not None and self.last_at else 0.0

    def update(self, images: int) -> float:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.images_stepped = 0  # the first step includes warm-up; measure from its end
        self.last_at = now
        self.events.append((now, images))
        while len(self.events) > 2 and now - self.events[0][0] > self.window_s:
            self.events.popleft()
        span = now - self.events[0][0]
        if span > 0:
            self.value = sum(n for _, n in list(self.events)[1:]) / span
        return self.value
