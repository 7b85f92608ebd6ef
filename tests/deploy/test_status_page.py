"""The status page renderer (`GET /`) on a synthetic History: numbers, floors, escaping, no external anything."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from deploy.evaluate import EvalRow
from deploy.history import History
from deploy.metrics import Metrics
from deploy.status_page import (
    CONTENT_SECURITY_POLICY,
    PAGE_HEADERS,
    PageData,
    collect,
    colour,
    list_snapshots,
    render,
)

HOSTILE = "<script>alert(1)</script>"
START = 1_700_000_000.0


def synthetic_history(domains=("digits", HOSTILE, "textures"), labelled: bool = True) -> History:
    history = History()
    for e in range(1, len(domains) + 1):
        row: list[float | None] = [round(0.9 - 0.07 * (e - j) + 0.001 * j, 6) for j in range(1, e + 1)]
        if not labelled:
            row = [None] * e
        linear = [None if v is None else v + 0.02 for v in row]
        floors = {"pixels": {"knn": 0.5 + 0.01 * e, "linear": 0.6 + 0.01 * e},
                  "untrained": {"knn": 0.4 + 0.01 * e, "linear": 0.45} if e != 2 else None,
                  "k": 20, "chance": 0.1 + 0.001 * e, "classes": 10}
        history.add_row(e, EvalRow(row, linear, [1.0 - 0.1 * (e - j) for j in range(1, e + 1)], [0.5] * e), floors,
                        {"domain": domains[e - 1], "images": 1000, "images_total": 1000 * e,
                         "time": START + 150 * e, "images_per_second": 120.0})
    return history


def synthetic_data(history: History | None = None, **extra) -> PageData:
    status = {"experience": 4, "domain": HOSTILE, "images_in_experience": 321, "images_total": 3321,
              "images_per_second": 87.5, "step": 200, "steps_skipped": 1, "lag": {"0": 12, "1": 3},
              "broker_reachable": True, "last_checkpoint": "exp-000003", "index_size": 900,
              "encoder_version": 3, "store": {"bytes": 5 << 20, "max_bytes": 1 << 30, "count": 3000},
              "uptime_seconds": 700.0, "topic": HOSTILE, "strategy": "replay", "device": "cpu",
              "preset": "cpu", "method": "simclr"}
    throughput = [{"time": START + 5 * k, "images_per_second": 100.0 + k % 20, "images_total": 40 * k}
                  for k in range(130)]
    base = dict(now=START + 700, status=status, history=history or synthetic_history(), throughput=throughput,
                rejected={HOSTILE: 3.0, "too-large": 7.0, "never": 0.0}, replay_images=500.0,
                replay_capacity=2000, index_vectors={"2": 100.0, "3": 900.0}, last_checkpoint_time=START + 690,
                snapshots=[{"name": "snap-1", "strategy": "route+sept", "chosen_experience": 2,
                            "retrieved_count": 150, "target_count": 40, "created_at": START + 600}],
                snapshot_count=1)
    return PageData(**{**base, **extra})


class Tables(HTMLParser):
    """Cells of every table by id: rows of (tag, attrs, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.current: str | None = None
        self.row: dict | None = None
        self.cell: dict | None = None
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes.extend((tag, k, v) for k, v in attrs)
        attrs = dict(attrs)
        if tag == "table":
            self.current, self.row = attrs.get("id"), None
            self.tables.setdefault(self.current, [])
        elif tag == "tr" and self.current is not None:
            self.row = {"attrs": attrs, "cells": []}
            self.tables[self.current].append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = {"tag": tag, "attrs": attrs, "text": ""}
            self.row["cells"].append(self.cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self.current, self.row = None, None
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def parse(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    parser.close()
    return parser


def values(table: list[dict], kind: str = "trained") -> list[list[float | None]]:
    """The data-value of each data cell of the rows of class `kind` (None: n/a, empty cells dropped)."""
    out = []
    for row in table:
        if kind not in (row["attrs"].get("class") or "").split():
            continue
        out.append([float(c["attrs"]["data-value"]) if "data-value" in c["attrs"] else None
                    for c in row["cells"] if c["tag"] == "td" and "empty" not in (c["attrs"].get("class") or "")])
    return out


def test_heatmap_numbers_are_r_and_floors_are_beside_it():
    history = synthetic_history()
    tables = parse(render(synthetic_data(history))).tables
    assert values(tables["matrix-knn"]) == history.accuracy
    assert values(tables["matrix-linear"]) == history.linear
    floors = {row["attrs"]["data-floor"]: [float(c["attrs"]["data-value"]) if "data-value" in c["attrs"] else None
                                           for c in row["cells"] if c["tag"] == "td"]
              for row in tables["matrix-knn"] if "data-floor" in row["attrs"]}
    assert floors["pixels"] == [history.baselines[str(j)]["pixels"]["knn"] for j in (1, 2, 3)]
    untrained = [(history.baselines[str(j)]["untrained"] or {}).get("knn") for j in (1, 2, 3)]
    assert floors["untrained"] == untrained and untrained[1] is None  # probe set 2 had no untrained floor
    assert floors["chance"] == [history.baselines[str(j)]["chance"] for j in (1, 2, 3)]
    # the printed number is the value, to 3 decimals, on its viridis colour
    cell = next(c for row in tables["matrix-knn"] for c in row["cells"] if "data-value" in c["attrs"])
    value = float(cell["attrs"]["data-value"])
    assert cell["text"] == f"{value:.3f}"
    assert colour(value) in cell["attrs"]["style"]


def test_summary_and_status_values_shown():
    history = synthetic_history()
    page = render(synthetic_data(history))
    summary = history.summary()
    for key in ("acc", "avg_forgetting"):
        assert f">{summary[key]:.3f}<" in page
    assert f">{summary['bwt']:+.3f}<" in page
    for text in ("3,321", "87.5", "exp-000003", "(10 s ago)", "500 / 2,000 images", "5.0 MiB / 1.0 GiB",
                 "900 <span class=\"dim\">(encoder 3, live)", "15 (p0: 12, p1: 3) records", "route+sept", "snap-1",
                 "tailord snapshot --target", 'http-equiv="refresh" content="5"', "prefers-color-scheme:dark"):
        assert text in page, text


def test_index_freshness_shown_only_when_the_index_lags():
    current = {"versions_behind": 0, "refresh_progress": 1.0, "unindexed": 0}
    assert "behind the newest checkpoint" not in render(synthetic_data(**status_extra(index_upkeep=current)))
    lagging = {"versions_behind": 2, "refresh_progress": 0.375, "unindexed": 1234}
    page = render(synthetic_data(**status_extra(index_upkeep=lagging)))
    assert "2 encoder version(s) behind the newest checkpoint, refresh 38% done" in page
    assert "1,234 stored samples waiting to be indexed" in page


def test_rows_of_r_show_how_far_scoring_is():
    assert "<dt>rows of R</dt><dd>none yet</dd>" in render(synthetic_data(**status_extra(
        last_evaluated_experience=None, evaluations_pending=0)))
    page = render(synthetic_data(**status_extra(last_evaluated_experience=3, evaluations_pending=1)))
    assert "<dt>rows of R</dt><dd>through experience 3 <span class=\"dim\">(1 experience end being scored)" in page


def status_extra(**fields) -> dict:
    """`synthetic_data` overrides whose status has `fields` added."""
    return {"status": {**synthetic_data().status, **fields}}


def test_hostile_stream_values_are_escaped():
    snapshot = {"name": HOSTILE, "strategy": '"><img src=x onerror=alert(1)>', "chosen_experience": HOSTILE,
                "retrieved_count": 1, "target_count": 1, "created_at": START}
    page = render(synthetic_data(snapshots=[snapshot], snapshot_count=1))
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parser = parse(page)
    assert "script" not in parser.tags and "img" not in parser.tags
    reasons = [c["text"] for row in parser.tables["rejected"] for c in row["cells"] if c["tag"] == "td"]
    assert reasons == ["too-large", "7", HOSTILE, "3"]  # unescaped back by the parser: shown as text
    # the hostile domain is a column and a row header of R, as text
    headers = [c["text"] for row in parser.tables["matrix-knn"] for c in row["cells"] if c["tag"] == "th"]
    assert f"2 · {HOSTILE}" in headers and f"after 2 · {HOSTILE}" in headers


def test_self_contained_no_script_no_links_no_forms():
    parser = parse(page := render(synthetic_data()))
    assert not {"script", "form", "input", "button", "a", "link", "iframe", "img", "object", "embed",
                "base"} & set(parser.tags)
    assert not [(tag, name) for tag, name, _ in parser.attributes
                if name in ("src", "href", "action", "formaction", "srcset", "xlink:href") or name.startswith("on")]
    assert "http://" not in page and "https://" not in page and "//" not in re.sub(r"<!DOCTYPE html>", "", page)
    assert "url(" not in page and "@import" not in page and "javascript:" not in page.lower()
    assert "<svg" in page and "<polyline" in page  # the throughput chart is drawn by the server
    assert page.count('class="end"') == 3  # the three experience ends are marked


def test_unlabelled_stream_shows_cka_and_loss():
    history = synthetic_history(labelled=False)
    page = render(synthetic_data(history))
    tables = parse(page).tables
    assert values(tables["matrix-knn"]) == history.accuracy  # all n/a
    assert "matrix-linear" not in tables
    assert values(tables["matrix-cka"]) == history.cka
    assert values(tables["matrix-loss"]) == history.probe_loss
    assert "No labels on the stream" in page
    assert "<details open>" in page


def test_empty_daemon_renders():
    page = render(PageData(now=START, status={"experience": 1, "broker_reachable": False}, history=History()))
    assert "No finished experience yet" in page and "No throughput samples yet" in page
    assert "down" in page and "None yet." in page


def test_headers_forbid_scripts():
    assert PAGE_HEADERS["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert CONTENT_SECURITY_POLICY == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    assert PAGE_HEADERS["X-Content-Type-Options"] == "nosniff"


def test_collect_reads_metrics_and_snapshot_manifests(tmp_path):
    metrics = Metrics()
    metrics.records_rejected.labels("undecodable").inc(4)
    metrics.index_vectors.labels("2").set(42)
    metrics.replay_buffer_images.set(17)
    metrics.last_checkpoint_timestamp.set(START)
    root = tmp_path / "snapshots"
    for i, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps(
            {"name": name, "strategy": "route", "chosen_experience": 1, "retrieved_count": 0,
             "target_count": 3, "created_at": START + i, "candidates": [{"secret": "not shown"}]}))
    (root / ".tmp-c-1234").mkdir()  # a snapshot being written
    (root / "broken").mkdir()  # no manifest: skipped
    service = SimpleNamespace(
        status=lambda: {"experience": 1, "domain": "digits"}, metrics=metrics, history=synthetic_history(),
        throughput=[], learner=SimpleNamespace(use_replay=True), snapshots=SimpleNamespace(root=root),
        settings=SimpleNamespace(replay_max_images=2000, state_dir=tmp_path))
    data = collect(service)
    assert data.rejected == {"undecodable": 4.0}
    assert data.index_vectors == {"2": 42.0}
    assert data.replay_images == 17.0 and data.replay_capacity == 2000
    assert data.last_checkpoint_time == START
    assert [m["name"] for m in data.snapshots] == ["b", "a"] and data.snapshot_count == 3
    assert "candidates" not in data.snapshots[0]
    assert list_snapshots(tmp_path / "missing") == ([], 0)


@pytest.mark.parametrize("value", [0.0, 0.05, 0.5, 0.999, 1.0])
def test_viridis_interpolation_hits_the_stops(value):
    assert re.fullmatch(r"#[0-9a-f]{6}", colour(value))
    assert colour(0.0) == "#440154" and colour(1.0) == "#fde725" and colour(0.5) == "#21918c"


def test_served_at_root_with_the_security_headers():
    import urllib.request

    from deploy.http_api import start_http

    page = render(synthetic_data()).encode()
    backend = SimpleNamespace(status_page=lambda: page)
    server = start_http("127.0.0.1", 0, backend, "token", 1024)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/?x=1", timeout=10) as resp:
            assert resp.status == 200 and resp.read() == page
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "no-store"
    finally:
        server.stop()


def test_experience_ends_between_samples_are_drawn_older_runs_are_not():
    from deploy.status_page import throughput_svg

    history = synthetic_history()  # ends at START + 150, 300, 450
    points = [{"time": START + 200 + 5 * k, "images_per_second": 50.0, "images_total": k} for k in range(20)]
    # samples from +200 to +295: the end at +450 (after the last sample) is drawn, the one at +150
    # (before this daemon started at +160) belongs to an earlier run and is not
    svg = throughput_svg(points, history.records, {}, since=START + 160)
    assert svg.count('class="end"') == 2
    assert throughput_svg(points, history.records, {}, since=START).count('class="end"') == 3


def get(url: str, headers: dict[str, str] | None = None) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_page_follows_the_metrics_token_rule_and_the_host_check():
    from deploy.http_api import start_http

    backend = SimpleNamespace(status_page=lambda: b"<!DOCTYPE html>", metrics_text=lambda: b"")
    for metrics_auth in (False, True):
        server = start_http("127.0.0.1", 0, backend, "token", 1024, metrics_auth=metrics_auth)
        url = f"http://127.0.0.1:{server.port}"
        try:
            for path in ("/", "/metrics"):  # / answers exactly when /metrics does
                assert get(url + path) == (401 if metrics_auth else 200), (path, metrics_auth)
                assert get(url + path, {"Authorization": "Bearer token"}) == 200
            # a DNS-rebound page (another name for this address) cannot read it
            assert get(url + "/", {"Host": f"evil.example:{server.port}", "Authorization": "Bearer token"}) == 403
        finally:
            server.stop()
