"""The container and monitoring files under deploy/: valid, consistent, and naming real metrics.

Prometheus files are checked by `promtool` (config, rules, and rule unit tests that make
each alert fire); the dashboard's queries are compiled by promtool too. Every `tailord_*`
series a query uses must be one `deploy.metrics.Metrics` exports (the live variant of
that check is in tests/e2e/test_prometheus.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tailord.json"
ALERTS = DEPLOY / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
METRIC = re.compile(r"\btailord_[a-z0-9_]+")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


# ---- helpers shared with tests/e2e/test_prometheus.py

def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (panel targets and annotations), variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for name, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(name, value) for e in exprs]
    return exprs


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def used_metric_names() -> set[str]:
    """The `tailord_*` series names used by the dashboard's queries and the alert expressions."""
    exprs = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def exported_series(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition offers, including families with no sample yet."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# ---- Prometheus

@needs_promtool
def test_promtool_checks_config_and_rules():
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_prometheus_scrapes_the_compose_service_and_loads_the_alerts():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    tailord = next(job for job in config["scrape_configs"] if job["job_name"] == "tailord")
    assert tailord["static_configs"][0]["targets"] == ["tailord:8080"]
    assert tailord.get("metrics_path", "/metrics") == "/metrics"


def test_alerts_cover_forgetting_lag_checkpoints_and_rejects():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"TailordForgettingHigh", "TailordConsumerLagGrowing", "TailordNoCheckpoint",
            "TailordRecordsRejected"} <= set(rules)
    assert "tailord_average_forgetting > 0.1" in rules["TailordForgettingHigh"]["expr"]
    assert rules["TailordForgettingHigh"]["for"] == "15m"
    assert rules["TailordConsumerLagGrowing"]["for"] == "10m"
    assert "> 1800" in rules["TailordNoCheckpoint"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


# Each case: input series (1-minute steps), then (minute, alert, expected label sets) evaluations.
LABELS = 'job="tailord", instance="tailord:8080"'
FIRING = {"job": "tailord", "instance": "tailord:8080"}
ALERT_CASES = {
    "forgetting": (
        {f"tailord_average_forgetting{{{LABELS}}}": "0.05x10 0.2x40"},
        [(20, "TailordForgettingHigh", []), (30, "TailordForgettingHigh", [FIRING])]),
    "lag growing": (
        {f'tailord_consumer_lag{{{LABELS}, partition="0"}}': "100x10 100+50x30",
         f'tailord_consumer_lag{{{LABELS}, partition="1"}}': "0x40"},
        [(10, "TailordConsumerLagGrowing", []), (17, "TailordConsumerLagGrowing", []),
         (25, "TailordConsumerLagGrowing", [FIRING])]),
    "lag steady": (
        {f'tailord_consumer_lag{{{LABELS}, partition="0"}}': "5000x40"},
        [(30, "TailordConsumerLagGrowing", [])]),
    "no checkpoint while training": (
        {f"tailord_last_checkpoint_timestamp_seconds{{{LABELS}}}": "0x60",
         f"tailord_images_trained_total{{{LABELS}}}": "0+100x60",
         f'tailord_consumer_lag{{{LABELS}, partition="0"}}': "0x60"},
        [(30, "TailordNoCheckpoint", []), (40, "TailordNoCheckpoint", [FIRING])]),
    "no checkpoint while records wait": (
        {f"tailord_last_checkpoint_timestamp_seconds{{{LABELS}}}": "0x60",
         f"tailord_images_trained_total{{{LABELS}}}": "500x60",
         f'tailord_consumer_lag{{{LABELS}, partition="0"}}': "40x60"},
        [(40, "TailordNoCheckpoint", [FIRING])]),
    "idle daemon needs no checkpoint": (
        {f"tailord_last_checkpoint_timestamp_seconds{{{LABELS}}}": "0x60",
         f"tailord_images_trained_total{{{LABELS}}}": "500x60",
         f'tailord_consumer_lag{{{LABELS}, partition="0"}}': "0x60"},
        [(50, "TailordNoCheckpoint", [])]),
    "checkpoints fail": (
        {f'tailord_checkpoint_errors_total{{{LABELS}, reason="OSError"}}': "0x5 1x20"},
        [(3, "TailordCheckpointFailing", []), (8, "TailordCheckpointFailing", [FIRING])]),
    "many rejects": (
        {f'tailord_records_consumed_total{{{LABELS}, topic="images"}}': "0+100x30",
         f'tailord_records_rejected_total{{{LABELS}, reason="undecodable"}}': "0+10x30"},
        [(8, "TailordRecordsRejected", []), (20, "TailordRecordsRejected", [FIRING])]),
    "few rejects": (
        {f'tailord_records_consumed_total{{{LABELS}, topic="images"}}': "0+100x30",
         f'tailord_records_rejected_total{{{LABELS}, reason="undecodable"}}': "0+1x30"},
        [(20, "TailordRecordsRejected", [])]),
    "index stale": (
        {f"tailord_index_stale_seconds{{{LABELS}}}": "0x5 0+600x90"},
        [(40, "TailordIndexStale", []), (75, "TailordIndexStale", [FIRING])]),
    "broker unreachable": (
        {f"tailord_broker_up{{{LABELS}}}": "1x5 0x20"},
        [(8, "TailordBrokerUnreachable", []), (15, "TailordBrokerUnreachable", [FIRING])]),
    "daemon down": (
        {f"up{{{LABELS}}}": "1x5 0x20"},
        [(15, "TailordDown", [FIRING])]),
}


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path):
    """`promtool test rules` on synthetic series: each alert fires after its `for`, and only then."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations too; the labels are what matter
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    tests = []
    for series, evaluations in ALERT_CASES.values():
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": name,
                                 "exp_alerts": [{"exp_labels": {**labels, "severity": severity(name)}}
                                                for labels in expected]}
                                for minute, name, expected in evaluations]})
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    done = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def severity(alert: str) -> str:
    return next(rule["labels"]["severity"] for rule in alert_rules() if rule["alert"] == alert)


# ---- Grafana

def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tailord" and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("throughput", "loss", "consumer lag", "knn accuracy", "accuracy matrix", "forgetting",
                  "checkpoint age", "rejected"):
        assert topic in titles, f"no panel about {topic}"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool compiles every dashboard query (as a recording rule)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_queries())]
    assert len(rules) >= 20
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tailord.yml").read_text())["providers"][0]
    grafana = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# ---- compose

def test_compose_file_wires_the_four_services():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"kafka", "tailord", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]

    tailord = services["tailord"]
    context = DEPLOY / tailord["build"]["context"]
    assert (context / tailord["build"]["dockerfile"]).is_file()
    env = tailord["environment"]
    assert env["TAILORD_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "kafka:9092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert env["TAILORD_HTTP_HOST"] == "0.0.0.0"
    assert env["TAILORD_ADMIN_TOKEN"].startswith("${TAILORD_ADMIN_TOKEN")  # from the operator's env, never a literal
    assert str(env["TAILORD_HTTP_PORT"]) == "8080" and any(p.endswith(":8080") for p in tailord["ports"])
    state_volume = next(v for v in tailord["volumes"] if v.endswith(":/var/lib/tailord"))
    assert state_volume.split(":")[0] in compose["volumes"]

    prometheus = services["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"] if v.startswith("./")}
    assert mounted == {"./prometheus.yml": "/etc/prometheus/prometheus.yml",
                       "./alerts.yml": "/etc/prometheus/alerts.yml"}
    for source in list(mounted) + [v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("./")]:
        assert (DEPLOY / source).exists(), source
    assert any(p.endswith(":9090") for p in prometheus["ports"])
    assert any(p.endswith(":3000") for p in services["grafana"]["ports"])


# ---- metric names

def test_every_metric_the_dashboard_and_alerts_use_is_exported():
    used = used_metric_names()
    assert {"tailord_average_forgetting", "tailord_knn_accuracy", "tailord_consumer_lag",
            "tailord_records_rejected_total", "tailord_last_checkpoint_timestamp_seconds"} <= used
    missing = used - exported_series(Metrics().render().decode())
    assert not missing, f"not exported by deploy.metrics: {sorted(missing)}"


def test_exported_series_knows_the_suffixes():
    text = Metrics().render().decode()
    names = exported_series(text)
    assert {"tailord_records_rejected_total", "tailord_train_step_seconds_bucket", "tailord_consumer_lag",
            "tailord_knn_accuracy"} <= names
    assert "tailord_records_rejected" not in names and "tailord_train_step_seconds" not in names
