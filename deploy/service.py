"""What the daemon shows the outside: readiness, status, evaluation gauges, the admin API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from deploy.boundaries import label
from deploy.history import History
from deploy.http_api import HttpServer, start_http, write_token_file
from deploy.learner import Learner
from deploy.metrics import Metrics
from deploy.progress import Progress
from deploy.settings import Settings
from deploy.snapshot_errors import NotFound, Unavailable
from deploy.snapshot_request import create_from_request
from deploy.status_page import render_service

log = structlog.get_logger()

THROUGHPUT_POINTS = 2000  # images/s samples kept for the report (one per ~5 s)


class DaemonService:
    """The daemon's state as the HTTP server and the gauges see it."""

    def __init__(self, settings: Settings, metrics: Metrics, learner: Learner, progress: Progress,
                 history: History, stream: Any, checkpoint_name: str | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.learner = learner
        self.progress = progress
        self.history = history
        self.stream = stream  # has reachable() and lag(), safe to call from any thread
        self.checkpoint_name = checkpoint_name
        self.started_at = time.time()
        self.throughput: list[dict] = []
        self.snapshots: Any = None  # the SnapshotEngine, set by the daemon
        self.indexer: Any = None  # the Indexer (sample store + FAISS index), set by the daemon
        self.evaluator: Any = None  # the Evaluator (rows of R scored off the loop), set by the daemon
        self.remote_lag: dict[int, int] = {}  # other DDP ranks' partitions, as their last tick said
        self._last_point = 0.0
        self.images_per_second = 0.0  # the training loop's sliding-window rate, for status
        self.torch_threads: int | None = None  # the training thread's intra-op threads (None before its loop)

    def start_http(self) -> HttpServer:
        """Serve HTTP; without TAILORD_ADMIN_TOKEN a fresh token goes to `<state>/admin.token` (0600)."""
        settings = self.settings
        if settings.admin_token is None:
            token, path = write_token_file(settings.state_dir)
            log.info("admin_token_generated", path=str(path),
                     note="no TAILORD_ADMIN_TOKEN set: a new token is written here (0600) at every start; "
                          "tailord status/snapshot read it from there")
        else:
            token = settings.admin_token.get_secret_value()
            if not token.strip():
                token = None
                log.warning("admin_api_unauthenticated", note="TAILORD_ADMIN_TOKEN is empty: /admin/* needs no "
                            "token (Host and Origin are still checked); unset it to get a generated token")
        return start_http(settings.http_host, settings.http_port, self, token, settings.upload_max_bytes,
                          allowed_hosts=settings.http_allowed_hosts, metrics_auth=settings.metrics_auth)

    # ---- gauges
    def publish_evaluation(self, history: History) -> None:
        """Export the latest row of R, CKA and probe losses, and the summary metrics."""
        self.history = history
        if not history.accuracy:
            return
        for values, gauge in ((history.accuracy[-1], self.metrics.knn_accuracy),
                              (history.linear[-1], self.metrics.linear_probe_accuracy),
                              (history.cka[-1], self.metrics.representation_drift_cka),
                              (history.probe_loss[-1], self.metrics.probe_ssl_loss)):
            for j, value in enumerate(values, start=1):
                if value is not None:
                    gauge.labels(str(j)).set(value)
        self.publish_baselines(history.baselines)
        summary = history.summary()
        for key, gauge in (("acc", self.metrics.average_accuracy), ("bwt", self.metrics.backward_transfer),
                           ("avg_forgetting", self.metrics.average_forgetting)):
            if summary[key] is not None:
                gauge.set(summary[key])

    def publish_baselines(self, baselines: dict[str, dict]) -> None:
        """Export every probe set's floors (raw pixels, untrained encoder) and chance level."""
        for experience, floors in baselines.items():
            if floors.get("chance") is not None:
                self.metrics.probe_chance_accuracy.labels(experience).set(floors["chance"])
            for baseline in ("pixels", "untrained"):
                for key, gauge in (("knn", self.metrics.knn_baseline_accuracy),
                                   ("linear", self.metrics.linear_baseline_accuracy)):
                    value = (floors.get(baseline) or {}).get(key)
                    if value is not None:
                        gauge.labels(experience, baseline).set(value)

    def record_throughput(self, images_per_second: float, images_total: int) -> None:
        """Keep one throughput point every few seconds (for `tailord report`)."""
        self.images_per_second = images_per_second
        now = time.time()
        if now - self._last_point < 5.0:
            return
        self._last_point = now
        self.throughput.append({"time": now, "images_per_second": images_per_second, "images_total": images_total})
        del self.throughput[:-THROUGHPUT_POINTS]

    def refresh_lag(self) -> dict[int, int]:
        lag = {**self.remote_lag, **self.stream.lag()}
        for partition, value in lag.items():
            self.metrics.consumer_lag.labels(str(partition)).set(value)
        return lag

    # ---- AdminBackend
    def metrics_text(self) -> bytes:
        self.refresh_lag()
        self.metrics.broker_up.set(1 if self.stream.reachable() else 0)
        return self.metrics.render()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        broker = bool(self.stream.reachable())
        return broker, {"broker_reachable": broker, "model_loaded": True}

    def status(self) -> dict[str, Any]:
        p = self.progress
        lag = self.refresh_lag()
        return {
            "experience": p.experience,
            "images_in_experience": p.images_in_experience,
            "images_total": p.images_total,
            "images_per_second": round(self.images_per_second, 1),
            "step": p.steps,
            "steps_skipped": p.steps_skipped,
            "domain": p.domain,
            "experience_name": label(p),  # the domain header, or `exp-N` on a header-less stream
            "experience_started_at": p.started_at,
            "experience_first_offsets": {str(k): v for k, v in p.first_offsets.items()},
            "boundary": self.settings.boundary,
            "positions": {str(k): v for k, v in p.positions.items()},
            "lag": {str(k): v for k, v in lag.items()},
            "broker_reachable": bool(self.stream.reachable()),
            "last_checkpoint": self.checkpoint_name,
            "index_size": self.indexer.index_size() if self.indexer else 0,
            "encoder_version": self.indexer.encoder_version if self.indexer else None,
            "index_upkeep": self.index_upkeep(),
            "evaluations_pending": self.evaluator.pending if self.evaluator else 0,  # rows of R still being scored
            "last_evaluated_experience": self.history.experiences[-1] if self.history.experiences else None,
            "store": self.indexer.store.stats() if self.indexer else None,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "topic": self.settings.topic,
            "strategy": self.settings.strategy,
            "device": str(self.learner.device),
            "torch_threads": self.torch_threads,
            **self.learner.describe(),
            **{k: v for k, v in self.history.summary().items()},
        }

    def index_upkeep(self) -> dict[str, Any] | None:
        """The live index's freshness and upkeep cost (docs/design.md, "Index upkeep")."""
        if self.indexer is None:
            return None
        upkeep = self.indexer.upkeep()
        return {"versions_behind": upkeep.versions_behind, "stale_seconds": round(upkeep.stale_seconds, 1),
                "refresh_progress": round(upkeep.refresh_progress, 3), "unindexed": upkeep.unindexed,
                "compute_share": round(upkeep.share, 4),
                "seconds": {kind: round(value, 1) for kind, value in upkeep.seconds.items()}}

    def create_snapshot(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if self.snapshots is None:
            raise Unavailable("snapshots are not available yet: the sample store is still opening")
        return create_from_request(self.snapshots, content_type, body)

    def get_snapshot(self, name: str) -> dict[str, Any]:
        if self.snapshots is None:
            raise NotFound(f"no snapshot {name!r}")
        return self.snapshots.describe(name)

    def status_page(self) -> bytes:
        """`GET /`: the live status page (deploy/status_page.py)."""
        return render_service(self)

    def snapshot_file(self, name: str, filename: str) -> Path:
        if self.snapshots is None:
            raise NotFound(f"no snapshot {name!r}")
        return self.snapshots.file_path(name, filename)
