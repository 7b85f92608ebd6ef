"""`tailord report` on a synthetic state dir written by the daemon's own `History.export`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deploy.errors import UsageError
from deploy.evaluate import EvalRow
from deploy.history import History
from deploy.report import floor_rows, write_report

DOMAINS = ("digits", "fashion", "textures", "photos")


def synthetic_state(state_dir: Path, experiences: int = 4) -> Path:
    """A state dir whose metrics/ holds `experiences` rows of R and 10 minutes of throughput."""
    history = History()
    start = 1_700_000_000.0
    for e in range(1, experiences + 1):
        row: list[float | None] = [0.9 - 0.05 * (e - j) for j in range(1, e + 1)]
        if e == 3:
            row[1] = None  # probe set 2 not evaluated (no labels): must show as a blank
        floors = {"pixels": {"knn": 0.7, "linear": 0.8}, "untrained": {"knn": 0.6, "linear": 0.7}}
        history.add_row(e, EvalRow(row, row, [1.0] * e, [0.5] * e), floors,
                        {"domain": DOMAINS[e - 1], "images": 1000, "images_total": 1000 * e,
                         "time": start + 150 * e, "images_per_second": 120.0})
    throughput = [{"time": start + 5 * k, "images_per_second": 100 + k % 20, "images_total": 40 * k}
                  for k in range(120)]
    history.export(state_dir / "metrics", throughput)
    return state_dir


def test_report_of_four_experiences(tmp_path):
    out = tmp_path / "out" / "report.png"
    assert write_report(synthetic_state(tmp_path / "state"), out) == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 1200 and height >= 900
        # a real plot, not a blank canvas: many distinct colours (heatmap, lines, text)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 500
    assert out.stat().st_size > 50_000
    assert not list(out.parent.glob(".*.tmp"))


def test_report_of_one_experience_and_no_throughput(tmp_path):
    state = tmp_path / "state"
    history = History()
    history.add_row(1, EvalRow([0.8], [0.9], [1.0], [0.4]), {}, {"domain": "digits", "images": 10, "images_total": 10, "time": 1.0,
                                              "images_per_second": 50.0})
    history.export(state / "metrics", [])
    out = tmp_path / "report.png"
    write_report(state, out)
    assert out.stat().st_size > 20_000


def test_empty_state_dir_gives_a_placeholder(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "report.png"
    write_report(state, out)
    with Image.open(out) as image:
        assert image.size[0] < 1200  # the small "nothing yet" figure, not the full report
    assert out.stat().st_size > 5_000


def test_missing_state_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        write_report(tmp_path / "nope", tmp_path / "report.png")


def test_cli_report(tmp_path):
    tailord = str(Path(sys.executable).with_name("tailord"))  # the console script users run
    state = synthetic_state(tmp_path / "state", experiences=2)
    out = tmp_path / "r.png"
    done = subprocess.run([tailord, "report", "--state-dir", str(state), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert out.is_file()
    missing = subprocess.run([tailord, "report", "--state-dir", str(tmp_path / "x"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_floor_rows_follow_the_probe_sets_and_leave_gaps_where_unscored():
    baselines = {"1": {"pixels": {"knn": 0.7}, "untrained": {"knn": 0.6}}, "2": {}, "3": {"untrained": None}}
    assert floor_rows(baselines, 3) == [[0.7, None, None], [0.6, None, None]]
