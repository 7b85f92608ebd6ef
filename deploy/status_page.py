"""The live status page: `GET /` on the daemon's HTTP server, one self-contained HTML page.

Server-rendered (it works without JavaScript and has none), refreshed by the browser every
`REFRESH_S` seconds (`<meta http-equiv="refresh">`), no external script, style, font or image:
the throughput chart is inline SVG drawn here and the accuracy matrix an HTML table coloured
with viridis (readable by colour-blind readers; every cell also prints its number).

Safe by construction: every value that comes from the stream or a client (domain, reject
reason, snapshot name...) goes through `esc` (html.escape) before it reaches the page; the
page has no forms and no links, and is served with `PAGE_HEADERS` (a CSP allowing inline
styles and nothing else, nosniff, no framing, no caching). It shows what `/metrics` and
`/admin/status` already tell (counts, accuracies, names of domains and snapshots), never
images, sample ids, labels, paths or the token.

`collect(service)` reads a `DaemonService` into a `PageData`; `render(data)` is a pure
function of it (unit tests render synthetic data).
"""

from __future__ import annotations

import functools
import html
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.snapshot_files import SNAPSHOTS_DIR, SnapshotShelf

if TYPE_CHECKING:  # the page module is stdlib-only: the HTTP server imports its headers
    from deploy.history import History

REFRESH_S = 5
PAGE_CONTENT_TYPE = "text/html; charset=utf-8"
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_SNAPSHOTS = 20  # newest snapshots listed
SNAPSHOT_KEYS = ("name", "strategy", "chosen_experience", "retrieved_count", "target_count", "created_at")
MAX_CHART_POINTS = 600  # throughput samples drawn (the service keeps up to 2000)

# matplotlib's viridis at 0, 0.1, ..., 1 (perceptually uniform, colour-blind safe)
VIRIDIS = ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
           "#7ad151", "#bddf26", "#fde725")
CIVIDIS = ("#00224e", "#123570", "#3b496c", "#575d6d", "#707173", "#8a8779", "#a69d75", "#c4b56c",
           "#e4cf5b", "#fee838", "#fee838")


@dataclass
class PageData:
    """Everything the page shows, read at one instant."""

    now: float
    status: dict[str, Any]
    history: History
    throughput: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, float] = field(default_factory=dict)  # reason -> records since start
    replay_images: float | None = None
    replay_capacity: int | None = None  # None: the strategy keeps no replay buffer
    index_vectors: dict[str, float] = field(default_factory=dict)  # encoder version -> vectors
    last_checkpoint_time: float | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    snapshot_count: int = 0


# ---- reading the daemon

def collect(service: Any) -> PageData:
    """Read a `DaemonService` (status, history, throughput, metrics, snapshot manifests)."""
    status = service.status()
    registry = service.metrics.registry
    rejected = {labels.get("reason", "?"): value
                for labels, value in metric_samples(registry, "tailord_records_rejected_total")}
    index_vectors = {labels.get("encoder_version", "?"): value
                     for labels, value in metric_samples(registry, "tailord_index_vectors")}
    replay = [value for _, value in metric_samples(registry, "tailord_replay_buffer_images")]
    stamp = [value for _, value in metric_samples(registry, "tailord_last_checkpoint_timestamp_seconds")]
    uses_replay = bool(getattr(service.learner, "use_replay", False))
    engine = getattr(service, "snapshots", None)
    root = Path(engine.root) if engine is not None else Path(service.settings.state_dir) / SNAPSHOTS_DIR
    snapshots, count = list_snapshots(root)
    return PageData(
        now=time.time(), status=status, history=service.history, throughput=list(service.throughput),
        rejected=rejected, replay_images=replay[0] if replay else None,
        replay_capacity=service.settings.replay_max_images if uses_replay else None,
        index_vectors=index_vectors, last_checkpoint_time=stamp[0] if stamp and stamp[0] > 0 else None,
        snapshots=snapshots, snapshot_count=count)


def metric_samples(registry: Any, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in a prometheus_client registry."""
    return [(dict(sample.labels), float(sample.value))
            for family in registry.collect() for sample in family.samples if sample.name == name]


def list_snapshots(root: Path, most: int = MAX_SNAPSHOTS) -> tuple[list[dict[str, Any]], int]:
    """The newest `most` snapshot manifests under `root` (`SnapshotShelf.newest`), cut to
    SNAPSHOT_KEYS (name, strategy, chosen experience, retrieved count, created at), and how
    many snapshots there are."""
    manifests, count = SnapshotShelf(root).newest(most)
    return [{key: manifest.get(key) for key in SNAPSHOT_KEYS} for manifest in manifests], count


# ---- formatting

def esc(value: Any) -> str:
    """Any value as safe HTML text (and safe inside a double-quoted attribute)."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3, sign: str = "") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return "n/a"
    return f"{value:{sign}.{digits}f}"


def count(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    return f"{int(value):,}"


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "n/a"  # pragma: no cover


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def clock(stamp: float | None, date: bool = False) -> str:
    if not isinstance(stamp, int | float):
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(stamp))


def colour(value: float, palette: tuple[str, ...] = VIRIDIS) -> str:
    """The palette's colour at `value` in [0, 1], interpolated between its stops."""
    value = min(max(value, 0.0), 1.0) * (len(palette) - 1)
    low = min(int(value), len(palette) - 2)
    t = value - low
    a, b = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (palette[low], palette[low + 1]))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b, strict=True))


def text_colour(value: float, palette: tuple[str, ...] = VIRIDIS) -> str:
    """Black on the light end of the palette, white on the dark end."""
    r, g, b = (int(colour(value, palette)[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 110 else "#fff"


@functools.lru_cache(maxsize=4096)
def cell_colours(value: float, palette: tuple[str, ...]) -> str:
    """`background:..;color:..` of a heatmap cell (cached: a 50-experience matrix has thousands)."""
    return f"background:{colour(value, palette)};color:{text_colour(value, palette)}"


def nice_step(span: float, ticks: int = 4) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks over `span`."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


# ---- sections

def label(experience: Any, domains: dict[int, Any], most: int | None = None) -> str:
    """`2 · fashion`, escaped (the domain cut to `most` characters)."""
    domain = domains.get(experience)
    if domain and most is not None and len(str(domain)) > most:
        domain = str(domain)[:most - 1] + "…"
    return esc(f"{experience} · {domain}" if domain else f"{experience}")


def status_section(data: PageData) -> str:
    s = data.status
    lag = s.get("lag") or {}
    lag_total = sum(v for v in lag.values() if isinstance(v, int | float))
    lag_text = count(lag_total) + (" (" + ", ".join(f"p{esc(p)}: {count(v)}" for p, v in sorted(lag.items())) + ")"
                                   if len(lag) > 1 else "")
    broker = ('<span class="ok">&#9679; up</span>' if s.get("broker_reachable")
              else '<span class="bad">&#9650; down</span>')
    checkpoint = esc(s.get("last_checkpoint") or "none yet")
    if data.last_checkpoint_time is not None:
        checkpoint += f" <span class=\"dim\">({duration(data.now - data.last_checkpoint_time)} ago)</span>"
    domain = s.get("experience_name") or s.get("domain")
    rows = [
        ("experience in progress", f"{esc(s.get('experience', 'n/a'))}" + (f" · {esc(domain)}" if domain else "")),
        ("images trained", f"{count(s.get('images_total'))} <span class=\"dim\">({count(s.get('images_in_experience'))}"
                           " in this experience)</span>"),
        ("images / s", num(s.get("images_per_second"), 1)),
        ("consumer lag", lag_text + " records"),
        ("broker", broker),
        ("last checkpoint", checkpoint),
        ("rows of R", evaluation_text(s)),
        ("replay buffer", replay_text(data)),
        ("sample store", store_text(s.get("store"))),
        ("index vectors", index_text(data)),
        ("steps", f"{count(s.get('step'))} <span class=\"dim\">({count(s.get('steps_skipped'))} skipped)</span>"),
        ("strategy · method", f"{esc(s.get('strategy', 'n/a'))} · {esc(s.get('method', 'n/a'))}"),
        ("preset · device", f"{esc(s.get('preset', 'n/a'))} · {esc(s.get('device', 'n/a'))}"),
        ("topic", esc(s.get("topic", "n/a"))),
        ("uptime", duration(s.get("uptime_seconds"))),
    ]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<section id="status"><h2>Status</h2><dl class="kv">{items}</dl></section>'


def evaluation_text(status: dict[str, Any]) -> str:
    """How far the accuracy matrix has been scored (rows lag their experience end by at most one
    experience: docs/design.md, "deploy — evaluation at each experience end")."""
    last, pending = status.get("last_evaluated_experience"), status.get("evaluations_pending") or 0
    scored = f"through experience {esc(last)}" if last is not None else "none yet"
    if isinstance(pending, int) and pending > 0:
        scored += f' <span class="dim">({pending} experience end{"s" if pending > 1 else ""} being scored)</span>'
    return scored


def bar(fraction: float | None) -> str:
    if fraction is None:
        return ""
    fraction = min(max(fraction, 0.0), 1.0)
    return (f'<span class="bar" title="{fraction:.0%}"><span style="width:{fraction * 100:.1f}%"></span></span>')


def replay_text(data: PageData) -> str:
    if data.replay_capacity is None:
        return '<span class="dim">none (the strategy keeps no replay buffer)</span>'
    images = data.replay_images or 0
    fraction = images / data.replay_capacity if data.replay_capacity else None
    return f"{count(images)} / {count(data.replay_capacity)} images {bar(fraction)}"


def store_text(store: Any) -> str:
    if not isinstance(store, dict):
        return '<span class="dim">opening</span>'
    used, most = store.get("bytes"), store.get("max_bytes")
    fraction = used / most if isinstance(used, int | float) and isinstance(most, int | float) and most else None
    return f"{size(used)} / {size(most)} {bar(fraction)} <span class=\"dim\">({count(store.get('count'))} samples)</span>"


def index_text(data: PageData) -> str:
    if not data.index_vectors:
        return f"{count(data.status.get('index_size', 0))}"
    live = str(data.status.get("encoder_version"))
    parts = [f"{count(v)} <span class=\"dim\">(encoder {esc(k)}{', live' if k == live else ''})</span>"
             for k, v in sorted(data.index_vectors.items())]
    return "<br>".join(parts + freshness_lines(data.status.get("index_upkeep")))


def freshness_lines(upkeep: Any) -> list[str]:
    """What the live index lags (docs/design.md, "Index upkeep"); nothing when it is current."""
    if not isinstance(upkeep, dict):
        return []
    lines = []
    behind, progress = upkeep.get("versions_behind"), upkeep.get("refresh_progress")
    if isinstance(behind, int) and behind > 0:
        done = f", refresh {progress:.0%} done" if isinstance(progress, float) and progress < 1 else ""
        lines.append(f'<span class="dim">{behind} encoder version(s) behind the newest checkpoint{done}</span>')
    waiting = upkeep.get("unindexed")
    if isinstance(waiting, int) and waiting > 0:
        lines.append(f'<span class="dim">{count(waiting)} stored samples waiting to be indexed</span>')
    return lines


def summary_section(history: History) -> str:
    summary = history.summary()
    tiles = [("ACC", num(summary.get("acc")), "mean kNN accuracy over probe sets, higher is better"),
             ("average forgetting", num(summary.get("avg_forgetting")), "lower is better"),
             ("BWT", num(summary.get("bwt"), sign="+"), "backward transfer, below 0 = forgetting"),
             ("linear-probe ACC", num(summary.get("acc_linear")), "mean linear-probe accuracy")]
    return '<div class="tiles">' + "".join(
        f'<div class="tile"><div class="dim">{name}</div><div class="big">{value}</div>'
        f'<div class="dim small">{hint}</div></div>' for name, value, hint in tiles) + "</div>"


FLOORS = (("pixels", "floor: raw pixels"), ("untrained", "floor: untrained encoder"))


def matrix_table(table_id: str, matrix: list[list[float | None]], experiences: list[int],
                 domains: dict[int, Any], baselines: dict[str, dict] | None = None, kind: str = "knn",
                 palette: tuple[str, ...] | None = VIRIDIS, digits: int = 3) -> str:
    """Row i = after experience i, column j = probe set j; a coloured cell holds its value in
    `data-value` (full precision) and prints it; below, each probe set's floors and chance."""
    columns = max((len(row) for row in matrix), default=0)
    if not columns:
        return '<p class="dim">No finished experience yet: the first row appears when the first one ends.</p>'
    head = "".join(f'<th scope="col">{label(experiences[j] if j < len(experiences) else j + 1, domains)}</th>'
                   for j in range(columns))
    rows = [f'<tr><th scope="col" class="corner">after &#8595; · probe set &#8594;</th>{head}</tr>']
    for experience, row in zip(experiences, matrix, strict=False):
        cells = "".join(cell(row[j] if j < len(row) else None, j < len(row), palette, digits) for j in range(columns))
        rows.append(f'<tr class="trained"><th scope="row">after {label(experience, domains)}</th>{cells}</tr>')
    if baselines is not None:
        probe_keys = [str(experiences[j]) if j < len(experiences) else str(j + 1) for j in range(columns)]
        for i, (key, name) in enumerate(FLOORS):
            values = [((baselines.get(k) or {}).get(key) or {}).get(kind) for k in probe_keys]
            cells = "".join(cell(v, True, palette, digits) for v in values)
            rows.append(f'<tr class="floor{" first" if i == 0 else ""}" data-floor="{key}">'
                        f'<th scope="row">{name}</th>{cells}</tr>')
        chance = [(baselines.get(k) or {}).get("chance") for k in probe_keys]
        cells = "".join(cell(v, True, palette, digits) for v in chance)
        rows.append(f'<tr class="floor" data-floor="chance"><th scope="row">chance (most frequent class)</th>'
                    f"{cells}</tr>")
    return f'<table class="matrix" id="{table_id}">' + "".join(rows) + "</table>"


def cell(value: float | None, evaluated: bool, palette: tuple[str, ...] | None, digits: int) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return '<td class="na" title="not evaluated: no labels or too few probes">n/a</td>' if evaluated \
            else '<td class="empty"></td>'
    style = f' style="{cell_colours(round(value, 3), palette)}"' if palette is not None else ""
    return f'<td class="v" data-value="{float(value)!r}"{style}>{value:.{digits}f}</td>'


def legend(palette: tuple[str, ...], low: str = "0", high: str = "1") -> str:
    stops = ", ".join(palette)
    return (f'<div class="legend"><span>{low}</span><span class="ramp" style="background:linear-gradient('
            f'to right, {stops})"></span><span>{high}</span></div>')


def accuracy_section(history: History, domains: dict[int, Any]) -> str:
    labelled = any(v is not None for row in history.accuracy for v in row)
    parts = ['<section id="accuracy"><h2>Accuracy matrix R</h2>',
             "<p>R[i][j]: leave-one-out kNN accuracy on probe set j (held-out images of experience j, never "
             "trained on) after experience i. Each trained row should beat the floors below it: raw pixels and "
             "the untrained encoder scored on the same probes, and chance.</p>",
             summary_section(history),
             matrix_table("matrix-knn", history.accuracy, history.experiences, domains, history.baselines, "knn"),
             legend(VIRIDIS)]
    if history.accuracy and not labelled:
        parts.append('<p class="note">No labels on the stream: accuracies need a <code>label</code> header. '
                     "CKA drift and the probe SSL loss below stand in.</p>")
    if history.linear and any(v is not None for row in history.linear for v in row):
        parts.append("<details><summary>Linear-probe R (cross-validated logistic regression) and its floors"
                     "</summary>" + matrix_table("matrix-linear", history.linear, history.experiences, domains,
                                                 history.baselines, "linear") + "</details>")
    if history.cka:
        open_ = "" if labelled else " open"
        parts.append(f"<details{open_}><summary>Representation drift (linear CKA of probe features now vs at their "
                     "experience's end; 1 = unchanged) and probe SSL loss</summary>"
                     + matrix_table("matrix-cka", history.cka, history.experiences, domains, palette=CIVIDIS)
                     + legend(CIVIDIS)
                     + matrix_table("matrix-loss", history.probe_loss, history.experiences, domains, palette=None)
                     + "</details>")
    parts.append("</section>")
    return "".join(parts)


@dataclass(frozen=True)
class ChartBox:
    """The plot area's margins inside a width x height SVG."""

    left: int
    right: int
    top: int
    bottom: int
    width: int
    height: int


def chart_axes(box: ChartBox, t0: float, span: float, ymax: float, ystep: float,
               x: Callable[[float], float], y: Callable[[float], float]) -> list[str]:
    """Grid lines, tick labels and axis titles: images/s up the side, minutes since `t0` along."""
    out = []
    tick = 0.0
    while tick <= ymax + 1e-9:
        out.append(f'<line class="grid" x1="{box.left}" x2="{box.width - box.right}" y1="{y(tick):.1f}" '
                   f'y2="{y(tick):.1f}"/><text class="axis" x="{box.left - 6}" y="{y(tick) + 4:.1f}" '
                   f'text-anchor="end">{tick:g}</text>')
        tick += ystep
    minutes = span / 60
    xstep = nice_step(minutes, 6)
    tick = 0.0
    while tick <= minutes + 1e-9:
        at = x(t0 + tick * 60)
        out.append(f'<line class="grid" x1="{at:.1f}" x2="{at:.1f}" y1="{box.top}" y2="{box.height - box.bottom}"/>'
                   f'<text class="axis" x="{at:.1f}" y="{box.height - box.bottom + 16}" text-anchor="middle">'
                   f'{tick:g}</text>')
        tick += xstep
    middle = (box.top + box.height - box.bottom) / 2
    out.append(f'<text class="axis" x="{(box.left + box.width - box.right) / 2:.0f}" y="{box.height - 4}" '
               f'text-anchor="middle">minutes since {clock(t0)}</text>'
               f'<text class="axis" x="12" y="{middle:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {middle:.0f})">images / s</text>')
    return out


def throughput_svg(points: list[dict[str, Any]], records: list[dict[str, Any]], domains: dict[int, Any],
                   since: float | None = None, width: int = 960, height: int = 260) -> str:
    """Images/s over wall-clock time as an inline SVG line, experience ends as dashed lines.

    The time axis spans the samples and every experience end since `since` (when this
    daemon started; default: the first sample), so an end between samples is drawn too."""
    points = [p for p in points if isinstance(p.get("time"), int | float)
              and isinstance(p.get("images_per_second"), int | float)]
    if not points:
        return '<p class="dim">No throughput samples yet (one every 5 s while training).</p>'
    stride = max(1, math.ceil(len(points) / MAX_CHART_POINTS))
    drawn = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    left, right, top, bottom = 56, 16, 14, 38
    ends = [r for r in records if isinstance(r.get("time"), int | float)
            and r["time"] >= (points[0]["time"] if since is None else min(since, points[0]["time"]))]
    t0 = min([points[0]["time"]] + [r["time"] for r in ends])
    t1 = max([points[-1]["time"]] + [r["time"] for r in ends])
    span = max(t1 - t0, 1.0)
    peak = max(p["images_per_second"] for p in points)
    ystep = nice_step(peak or 1.0)
    ymax = ystep * math.ceil(max(peak, 1e-9) * 1.1 / ystep)

    def x(t: float) -> float:
        return left + (t - t0) / span * (width - left - right)

    def y(v: float) -> float:
        return top + (1 - v / ymax) * (height - top - bottom)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-label="training images per second over time">']
    out += chart_axes(ChartBox(left, right, top, bottom, width, height), t0, span, ymax, ystep, x, y)
    for record in ends:
        at = x(record["time"])
        name = label(record.get("experience"), domains, 24)
        out.append(f'<line class="end" x1="{at:.1f}" x2="{at:.1f}" y1="{top}" y2="{height - bottom}"/>'
                   f'<text class="endlabel" x="{at - 4:.1f}" y="{top + 4}" text-anchor="end" '
                   f'transform="rotate(-90 {at - 4:.1f} {top + 4})">end {name}</text>')
    if len(drawn) == 1:
        p = drawn[0]
        out.append(f'<circle class="dot" cx="{x(p["time"]):.1f}" cy="{y(p["images_per_second"]):.1f}" r="3"/>')
    else:
        coords = " ".join(f"{x(p['time']):.1f},{y(p['images_per_second']):.1f}" for p in drawn)
        out.append(f'<polyline class="line" points="{coords}"/>')
    out.append("</svg>")
    return "".join(out)


def throughput_section(data: PageData, domains: dict[int, Any]) -> str:
    rates = [p.get("images_per_second") for p in data.throughput if isinstance(p.get("images_per_second"),
                                                                               int | float)]
    uptime = data.status.get("uptime_seconds")
    started = data.now - uptime if isinstance(uptime, int | float) else None
    mean = f" · mean {sum(rates) / len(rates):.1f} images/s over {duration(data.throughput[-1]['time'] - data.throughput[0]['time'])}" \
        if rates else ""
    return (f'<section id="throughput"><h2>Training throughput{mean}</h2>'
            + throughput_svg(data.throughput, data.history.records, domains, started)
            + '<p class="dim small">Dashed lines: experience ends. Samples since this daemon started.</p></section>')


def experiences_section(data: PageData) -> str:
    records = data.history.records
    rows, previous_end = [], None
    for record in records:
        end = record.get("time")
        span = (f"{clock(previous_end)} – {clock(end)} ({duration(end - previous_end)})"
                if isinstance(previous_end, int | float) and isinstance(end, int | float)
                else f"ended {clock(end, date=True)}")
        rows.append(f"<tr><td>{esc(record.get('experience'))}</td><td>{esc(record.get('domain') or '?')}</td>"
                    f'<td class="r">{count(record.get("images"))}</td><td class="r">{count(record.get("images_total"))}'
                    f'</td><td class="r">{num(record.get("images_per_second"), 1)}</td><td>{span}</td></tr>')
        previous_end = end if isinstance(end, int | float) else None
    s = data.status
    since = f"since {clock(previous_end)} ({duration(data.now - previous_end)})" if previous_end else "in progress"
    rows.append(f'<tr class="current"><td>{esc(s.get("experience", "?"))}</td><td>{esc(s.get("experience_name") or s.get("domain") or "?")}</td>'
                f'<td class="r">{count(s.get("images_in_experience"))}</td><td class="r">{count(s.get("images_total"))}'
                f'</td><td class="r">{num(s.get("images_per_second"), 1)}</td><td>in progress, {since}</td></tr>')
    return ('<section id="experiences"><h2>Experiences</h2><table class="list"><tr><th>#</th><th>domain</th>'
            '<th class="r">images</th><th class="r">images total</th><th class="r">images / s</th><th>time span</th>'
            "</tr>" + "".join(rows) + "</table></section>")


def snapshots_section(data: PageData) -> str:
    command = "<pre>tailord snapshot --target ./my-task --out ./my-backbone</pre>"
    intro = ("<p>A task-tailored checkpoint is built and copied to <code>--out</code> by the command below, on "
             "the daemon's machine (it reads the admin token from the settings or the state dir; for another "
             "daemon add <code>--url</code> and <code>--token-file</code>). A listed snapshot's files are at "
             "<code>/admin/snapshots/NAME/model.safetensors</code> and <code>manifest.json</code> (bearer "
             "token).</p>")
    if not data.snapshots:
        return f'<section id="snapshots"><h2>Snapshots</h2><p class="dim">None yet.</p>{intro}{command}</section>'
    rows = "".join(
        f"<tr><td>{esc(m.get('name'))}</td><td>{esc(m.get('strategy') or '?')}</td>"
        f"<td class=\"r\">{esc(m.get('chosen_experience') if m.get('chosen_experience') is not None else '?')}</td>"
        f"<td class=\"r\">{count(m.get('retrieved_count'))}</td><td class=\"r\">{count(m.get('target_count'))}</td>"
        f"<td>{clock(m.get('created_at'), date=True)}</td></tr>" for m in data.snapshots)
    more = (f'<p class="dim small">{data.snapshot_count - len(data.snapshots)} older not listed.</p>'
            if data.snapshot_count > len(data.snapshots) else "")
    return ('<section id="snapshots"><h2>Snapshots</h2><table class="list"><tr><th>name</th><th>strategy</th>'
            '<th class="r">chosen experience</th><th class="r">retrieved</th><th class="r">targets</th>'
            f"<th>created</th></tr>{rows}</table>{more}{intro}{command}</section>")


def rejected_section(data: PageData) -> str:
    counts = sorted(((reason, value) for reason, value in data.rejected.items() if value > 0),
                    key=lambda item: (-item[1], item[0]))
    if not counts:
        body = '<p class="dim">None since this daemon started.</p>'
    else:
        body = ('<table class="list" id="rejected"><tr><th>reason</th><th class="r">records</th></tr>'
                + "".join(f'<tr><td>{esc(reason)}</td><td class="r">{count(value)}</td></tr>'
                          for reason, value in counts) + "</table>")
    return (f'<section id="rejects"><h2>Rejected records</h2>{body}<p class="dim small">Counts by reason since this '
            "daemon started (<code>tailord_records_rejected_total</code>); the records are in "
            "<code>&lt;topic&gt;.dlq</code>.</p></section>")


STYLE = """
:root{color-scheme:light dark;--bg:#f7f7f5;--fg:#1d1d1f;--dim:#5f6368;--card:#fff;--line:#d9d9d6;
--accent:#0072b2;--end:#6b6b6b;--ok:#0072b2;--bad:#d55e00;--na:#ececea}
@media (prefers-color-scheme:dark){:root{--bg:#16181c;--fg:#e8e8e6;--dim:#a0a4aa;--card:#1f2228;
--line:#363a42;--accent:#56b4e9;--end:#9a9a9a;--ok:#56b4e9;--bad:#e69f00;--na:#2a2d33}}
*{box-sizing:border-box}
body{margin:0;padding:16px 24px;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;margin-bottom:12px}
h1{font-size:22px;margin:0}h2{font-size:17px;margin:0 0 10px}
main{display:grid;grid-template-columns:minmax(300px,380px) minmax(0,1fr);gap:16px;align-items:start}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;min-width:0}
#status{grid-row:span 2}#throughput,#experiences,#snapshots{grid-column:1/-1}
@media (max-width:900px){main{grid-template-columns:1fr}#status{grid-row:auto}}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:6px 12px;margin:0}
.kv dt{color:var(--dim)}.kv dd{margin:0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.dim{color:var(--dim)}.small{font-size:12.5px}.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}
.bar{display:inline-block;vertical-align:middle;width:90px;height:8px;border-radius:4px;background:var(--na);
overflow:hidden;margin-left:6px}.bar span{display:block;height:100%;background:var(--accent)}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 12px}
.tile{border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:150px}
.big{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
.matrix{margin:4px 0}.matrix th,.matrix td{padding:6px 10px;border:2px solid var(--card)}
.matrix th{font-weight:500;text-align:left;white-space:nowrap;overflow-wrap:anywhere}
.matrix td{text-align:center;min-width:64px}.matrix .corner{color:var(--dim);font-size:12.5px}
.matrix tr.first th,.matrix tr.first td{border-top:5px solid var(--card)}
.matrix tr.floor th{color:var(--dim)}.matrix td.na{background:var(--na);color:var(--dim)}
.list th,.list td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;overflow-wrap:anywhere}
.list .r{text-align:right}.list tr.current td{color:var(--dim);font-style:italic}
.legend{display:flex;align-items:center;gap:6px;font-size:12.5px;color:var(--dim);margin:4px 0 8px}
.ramp{display:inline-block;width:180px;height:10px;border-radius:3px}
details{margin-top:10px}summary{cursor:pointer;color:var(--dim)}
.note{border-left:3px solid var(--accent);padding-left:8px}
pre{background:var(--na);padding:8px 10px;border-radius:6px;overflow-x:auto;font-size:13px}
code{font-size:13px}
.chart{display:block;max-height:300px}.chart .grid{stroke:var(--line);stroke-width:1}
.chart .axis{fill:var(--dim);font-size:12px}.chart .line{fill:none;stroke:var(--accent);stroke-width:2}
.chart .dot{fill:var(--accent)}.chart .end{stroke:var(--end);stroke-width:1.2;stroke-dasharray:5 4}
.chart .endlabel{fill:var(--dim);font-size:11.5px}
"""


def render(data: PageData) -> str:
    """The whole page as HTML text."""
    history = data.history
    domains: dict[int, Any] = {r.get("experience"): r.get("domain") for r in history.records}
    s = data.status
    title = "tailord — " + (f"experience {s.get('experience')}" + (f" · {s.get('experience_name') or s.get('domain')}" if s.get("domain") else "")
                            if "experience" in s else "status")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<header><h1>tailord</h1><span class=\"dim\">topic {esc(s.get('topic', '?'))} · updated "
        f"{clock(data.now, date=True)} · refreshes every {REFRESH_S} s</span></header><main>",
        status_section(data),
        accuracy_section(history, domains),
        rejected_section(data),
        throughput_section(data, domains),
        experiences_section(data),
        snapshots_section(data),
        "</main></body></html>\n",
    ])


def render_service(service: Any) -> bytes:
    """`GET /` of a running daemon."""
    return render(collect(service)).encode("utf-8")
