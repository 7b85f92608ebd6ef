"""`tailord report`: one PNG with the accuracy matrix, forgetting over time and throughput.

Reads what the daemon exports after every checkpoint: `<state>/metrics/history.json`
(R, per-experience records with domain, ACC, BWT, average forgetting, and the
"throughput" samples). A state dir with no finished experience yet gives a figure that
says so, so the command is safe to run at any time.
"""

from __future__ import annotations

import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render straight to a file

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from safefiles.files import write_atomic  # noqa: E402

DPI = 110


def write_report(state_dir: Path, out: Path) -> str:
    """Render the report of `state_dir` into the PNG `out`; return the path written.

    A missing state dir is a usage error (`UsageError`); one with no finished
    experience yet gives a placeholder figure saying so.
    """
    from deploy.errors import UsageError

    state_dir, out = Path(state_dir), Path(out)
    if not state_dir.is_dir():
        raise UsageError(f"--state-dir {state_dir}: no such folder")
    history = read_history(state_dir)
    fig = report_figure(history, state_dir) if history["accuracy"] else placeholder_figure(state_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    write_atomic(out, png.getvalue())  # a reader never sees half a PNG
    return str(out)


def read_history(state_dir: Path) -> dict[str, Any]:
    """`metrics/history.json`, or an empty history if the daemon has not written it yet."""
    path = state_dir / "metrics" / "history.json"
    empty: dict[str, Any] = {"experiences": [], "accuracy": [], "records": [], "throughput": []}
    if not path.is_file():
        return empty
    return {**empty, **json.loads(path.read_text())}


def report_figure(history: dict[str, Any], state_dir: Path) -> Figure:
    """Accuracy matrix (top left), ACC/forgetting/BWT (top right), images/s (bottom)."""
    fig = plt.figure(figsize=(14, 10), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    domains = {r["experience"]: r.get("domain") or "?" for r in history["records"]}
    plot_matrix(fig.add_subplot(grid[0, 0]), history["accuracy"], history["experiences"], domains,
                history.get("baselines"))
    plot_summary(fig.add_subplot(grid[0, 1]), history["records"])
    plot_throughput(fig.add_subplot(grid[1, :]), history["throughput"], history["records"])
    fig.suptitle(f"tailord report — {state_dir.resolve().name}: {len(history['experiences'])} finished "
                 f"experiences, {history['records'][-1].get('images_total', 0):,} images trained",
                 fontsize=15, fontweight="bold")
    return fig


def placeholder_figure(state_dir: Path) -> Figure:
    """A figure saying there is nothing to plot yet (instead of an error)."""
    fig = plt.figure(figsize=(8, 3))
    fig.text(0.5, 0.6, "No finished experience yet", ha="center", fontsize=18, fontweight="bold")
    fig.text(0.5, 0.35, f"{state_dir.resolve()} has no evaluation results (metrics/history.json).\n"
             "The first row of the accuracy matrix appears when the first experience ends.",
             ha="center", fontsize=11, color="dimgray")
    return fig


def label(experience: int, domains: dict[int, str]) -> str:
    """`2 · fashion`: experience number and the domain it was trained on."""
    return f"{experience} · {domains.get(experience, '?')}"


FLOORS = (("pixels", "floor: raw pixels"), ("untrained", "floor: untrained encoder"))


def floor_rows(baselines: dict[str, dict], columns: int) -> list[list[float | None]]:
    """One row per floor (raw pixels, untrained encoder): its kNN accuracy on each probe set."""
    return [[((baselines.get(str(j + 1)) or {}).get(key) or {}).get("knn") for j in range(columns)]
            for key, _ in FLOORS]


def plot_matrix(ax: Axes, accuracy: list[list[float | None]], experiences: list[int],
                domains: dict[int, str], baselines: dict[str, dict] | None = None) -> None:
    """Heatmap of R (row i = after experience i, column j = probe set j; blanks not evaluated),
    with each probe set's floors below it: what raw pixels and the untrained encoder score."""
    columns = max(len(row) for row in accuracy)
    rows = accuracy + floor_rows(baselines or {}, columns)
    values = np.full((len(rows), columns), np.nan)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is not None:
                values[i, j] = value
    cmap = plt.get_cmap("viridis").with_extremes(bad="#f4f4f4")  # not evaluated: light grey
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(columns):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=11,
                        color="black" if values[i, j] > 0.6 else "white")
            elif j < len(rows[i]):  # evaluated, but no labels or too few probes
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=9, color="gray")
    ax.axhline(len(accuracy) - 0.5, color="white", linewidth=4)  # trained rows above, floors below
    ax.set_xticks(range(columns), [label(j + 1, domains) for j in range(columns)], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {label(e, domains)}" for e in experiences] + [n for _, n in FLOORS])
    ax.set_xlabel("probe set (experience · domain)")
    ax.set_title("Accuracy matrix R: leave-one-out kNN accuracy on probe set j after experience i,\n"
                 "and the floors each trained row should beat", fontsize=12)
    ax.figure.colorbar(image, ax=ax, label="kNN accuracy", shrink=0.85)


def plot_summary(ax: Axes, records: list[dict[str, Any]]) -> None:
    """ACC, average forgetting and BWT after each experience."""
    x = [r["experience"] for r in records]
    for key, name, style in (("acc", "ACC (mean accuracy, higher is better)", "o-"),
                             ("avg_forgetting", "average forgetting (lower is better)", "s-"),
                             ("bwt", "BWT (backward transfer, < 0 = forgetting)", "^-")):
        y = [np.nan if r.get(key) is None else r[key] for r in records]
        if not all(math.isnan(v) for v in y):
            last = next(v for v in reversed(y) if not math.isnan(v))
            ax.plot(x, y, style, linewidth=2, markersize=7, label=f"{name}: {last:+.3f}" if key == "bwt"
                    else f"{name}: {last:.3f}")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(x, [f"{r['experience']}\n{r.get('domain') or '?'}" for r in records])
    ax.set_xlabel("after experience")
    ax.set_ylabel("accuracy / accuracy difference")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), max(1.0, ax.get_ylim()[1]))
    ax.set_title("Accuracy and forgetting over experiences (last value in legend)", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)


def plot_throughput(ax: Axes, throughput: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Training images/s over wall-clock time, with the experience ends marked."""
    ax.set_ylabel("images / second")
    ax.grid(alpha=0.3)
    if not throughput:
        ax.set_title("Training throughput", fontsize=12)
        ax.text(0.5, 0.5, "no throughput samples yet", transform=ax.transAxes, ha="center", color="gray")
        return
    start = throughput[0]["time"]
    minutes = [(p["time"] - start) / 60 for p in throughput]
    rates = [p["images_per_second"] for p in throughput]
    ax.set_title(f"Training throughput: mean {np.mean(rates):.0f} images/s (dashed lines: experience ends)",
                 fontsize=12)
    ax.plot(minutes, rates, color="tab:blue", linewidth=1.5)
    for r in records:
        if "time" in r and r["time"] >= start:
            at = (r["time"] - start) / 60
            ax.axvline(at, color="gray", linestyle="--", linewidth=1)
            ax.annotate(f"end {label(r['experience'], {r['experience']: r.get('domain') or '?'})}",
                        (at, 1), xycoords=("data", "axes fraction"), xytext=(-3, -3),
                        textcoords="offset points", rotation=90, ha="right", va="top", fontsize=9,
                        color="dimgray")
    ax.set_xlabel(f"minutes since {datetime.fromtimestamp(start).strftime('%Y-%m-%d %H:%M:%S')}")
    ax.set_ylim(0, max(rates) * 1.35 or 1)  # headroom for the experience labels
