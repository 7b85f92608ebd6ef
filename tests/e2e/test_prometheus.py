"""Real Prometheus end to end: it scrapes a real daemon trained over three labelled domains.

The daemon (real broker, `python -m deploy.cli run`) finishes two experiences (digits,
then fashion; textures is the third in progress), so the accuracy matrix has two rows and
forgetting is defined. Prometheus 2 (`/usr/bin/prometheus`, Debian package) scrapes it
every second with deploy/alerts.yml loaded; its HTTP API must then return the forgetting
and kNN-accuracy series, answer every dashboard query, and report the alert rules healthy.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy_files import (
    ALERTS,
    dashboard_queries,
    exported_series,
    used_metric_names,
)
from tests.e2e.daemon_proc import DaemonProcess, free_port
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
DOMAINS = (("builtin:digits", 300), ("builtin:fashion", 300), ("builtin:textures", 120))


class Prometheus:
    """A Prometheus server on a free loopback port with its own config and storage."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "tailord", "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        self.args = [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.get("/-/ready") is not None, 30, "Prometheus ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
                return response.read()
        except OSError:
            return None

    def api(self, path: str, **params: str) -> dict:
        body = self.get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert body is not None, f"Prometheus did not answer /api/v1/{path}"
        return json.loads(body)

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"Prometheus exited:\n{self.log_path.read_text(errors='replace')[-3000:]}"
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n"
                             f"{self.log_path.read_text(errors='replace')[-3000:]}")


def produce(bootstrap: str, topic: str, source: str, limit: int) -> None:
    cmd = [sys.executable, "-m", "deploy.cli", "produce", source, "--topic", topic, "--bootstrap", bootstrap,
           "--limit", str(limit), "--batch", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["sent"] == limit


@pytest.fixture
def trained_daemon(broker, tmp_path) -> Iterator[DaemonProcess]:
    """A daemon that has finished two experiences (digits, fashion) and trains the third."""
    topic = unique_topic("prom")
    for source, limit in DOMAINS:
        produce(broker.bootstrap, topic, source, limit)
    daemon = DaemonProcess(tmp_path / "state", broker.bootstrap, topic, experience_images=10_000,
                           split_on_domain="true", probe_fraction=0.3, batch_size=32, checkpoint_interval_s=3600)
    daemon.start()
    try:
        daemon.wait_for(lambda: daemon.status().get("experience", 0) >= 3, 150, "two finished experiences")
        yield daemon
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)")
def test_prometheus_scrapes_forgetting_and_accuracy(trained_daemon, tmp_path):
    live = trained_daemon.metrics()
    missing = used_metric_names() - exported_series(live)
    assert not missing, f"dashboard/alerts use metrics the daemon does not export: {sorted(missing)}"

    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{trained_daemon.port}").start()
    try:
        prometheus.wait_for(lambda: len(prometheus.query("tailord_knn_accuracy")) >= 2
                            and prometheus.query("tailord_average_forgetting"), 60, "tailord series scraped")
        accuracy = {s["metric"]["probe_experience"]: float(s["value"][1])
                    for s in prometheus.query("tailord_knn_accuracy")}
        assert {"1", "2"} <= set(accuracy)
        assert all(0.0 < a <= 1.0 for a in accuracy.values())
        floors = prometheus.query('tailord_knn_baseline_accuracy{baseline="pixels"}')
        assert {s["metric"]["probe_experience"] for s in floors} >= {"1", "2"}
        [forgetting] = prometheus.query("tailord_average_forgetting")
        assert forgetting["metric"]["job"] == "tailord"
        assert -1.0 <= float(forgetting["value"][1]) <= 1.0
        assert len(prometheus.query("tailord_backward_transfer")) == 1
        [experience] = prometheus.query("tailord_experience")
        assert float(experience["value"][1]) >= 3

        # every dashboard query runs against real data; the core panels have something to show
        answered = {expr: prometheus.query(expr) for expr in dashboard_queries()}
        for expr in ("tailord_knn_accuracy", "tailord_ssl_loss", "tailord_consumer_lag",
                     "tailord_last_checkpoint_timestamp_seconds"):
            assert any(result for query, result in answered.items() if expr in query), expr

        # the alert rules load and evaluate without error on the live series
        def rules() -> list[dict]:
            return [rule for group in prometheus.api("rules")["data"]["groups"] for rule in group["rules"]]

        never = "0001-01-01"  # Go's zero time: the rule was not evaluated yet
        prometheus.wait_for(lambda: all(not r["lastEvaluation"].startswith(never) for r in rules()), 30,
                            "alert rules evaluated")
        rules = rules()
        assert len(rules) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    finally:
        prometheus.stop()
