"""The status page (`GET /`) of a real daemon on a labelled two-domain stream, and in a real browser.

The browser part needs Debian's `chromium` (`apt-get install chromium`); without it that test
is skipped. `TAILORD_UPDATE_SCREENSHOT=1` also writes its screenshot to docs/status-page.png.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.status_page import CONTENT_SECURITY_POLICY, colour
from tests.deploy.test_status_page import parse, values
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import produce
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "status-page.png"
SCREENSHOT_MAX_BYTES = 300_000
HOSTILE = "<img src=x onerror=alert(1)>"  # the third experience's domain header: must show as text


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory) -> Iterator[DaemonProcess]:
    """A daemon that has finished digits and fashion (textures closes fashion and stays in progress)."""
    topic = unique_topic("page")
    for source, count in (("builtin:digits", 240), ("builtin:fashion", 240)):
        produce(broker.bootstrap, topic, source, count, batch=8)
    produce(broker.bootstrap, topic, "builtin:textures", 40, domain=HOSTILE, batch=8)
    state = tmp_path_factory.mktemp("page") / "state"
    running = DaemonProcess(state, broker.bootstrap, topic, experience_images=100_000, probe_fraction=0.3,
                            batch_size=32, checkpoint_interval_s=3600).start()
    try:
        matrix_file = state / "metrics" / "accuracy_matrix.json"

        def two_rows() -> bool:  # written right after the experience-end checkpoint
            return matrix_file.is_file() and len(json.loads(matrix_file.read_text())["R"]) == 2

        running.wait_for(two_rows, 300, "two finished experiences")
        yield running
        assert running.stop() == 0
    finally:
        running.kill()


def fetch_page(daemon: DaemonProcess) -> tuple[dict[str, str], str]:
    with urllib.request.urlopen(daemon.url + "/", timeout=20) as resp:
        assert resp.status == 200
        return dict(resp.headers.items()), resp.read().decode("utf-8")


def test_status_page_shows_r_and_its_floors(daemon):
    headers, page = fetch_page(daemon)
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Type"].startswith("text/html")
    assert 'http-equiv="refresh"' in page and "<script" not in page.lower()
    matrix = json.loads((daemon.state_dir / "metrics" / "accuracy_matrix.json").read_text())
    tables = parse(page).tables
    assert values(tables["matrix-knn"]) == matrix["R"]  # exactly: the cells carry the full value
    assert values(tables["matrix-linear"]) == matrix["R_linear"]
    floors = {row["attrs"]["data-floor"]: [float(c["attrs"]["data-value"]) if "data-value" in c["attrs"] else None
                                           for c in row["cells"] if c["tag"] == "td"]
              for row in tables["matrix-knn"] if "data-floor" in row["attrs"]}
    assert floors["pixels"] == [matrix["baselines"][j]["pixels"]["knn"] for j in ("1", "2")]
    assert floors["untrained"] == [matrix["baselines"][j]["untrained"]["knn"] for j in ("1", "2")]
    assert floors["chance"] == [matrix["baselines"][j]["chance"] for j in ("1", "2")]
    headers_text = [c["text"] for row in tables["matrix-knn"] for c in row["cells"] if c["tag"] == "th"]
    assert "1 · digits" in headers_text and "after 2 · fashion" in headers_text
    assert f">{matrix['acc']:.3f}<" in page
    status = daemon.status()
    assert f"{status['experience']} · {html.escape(HOSTILE)}" in page  # the experience in progress, as text
    assert HOSTILE not in page and "<img" not in page.lower()
    assert "<svg" in page and page.count('class="end"') == 2  # both experience ends on the chart


def test_status_page_in_headless_chromium(daemon, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); the page itself is "
                    "checked by test_status_page_shows_r_and_its_floors")
    from PIL import Image

    shot = tmp_path / "page.png"
    # root needs --no-sandbox; no GPU, no profile of the user's
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600",
                    f"--screenshot={shot}", daemon.url + "/"],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"--user-data-dir={tmp_path / 'profile'}", daemon.url + "/"],
                         check=True, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)}).stdout
    assert "<img" not in dom.lower() and html.escape(HOSTILE, quote=False) in dom  # no injected element
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    colours = image.getcolors(1 << 24) or []
    assert len(colours) > 200, "blank screenshot"
    background_share = max(n for n, _ in colours) / (image.width * image.height)
    assert background_share < 0.9, "the page is mostly one colour"
    # the heatmap rendered: the viridis colour of R[0][0] is on screen
    matrix = json.loads((daemon.state_dir / "metrics" / "accuracy_matrix.json").read_text())
    cell = tuple(int(colour(matrix["R"][0][0])[i:i + 2], 16) for i in (1, 3, 5))
    assert any(rgb == cell for _, rgb in colours), f"no heatmap cell of colour {cell}"
    if os.environ.get("TAILORD_UPDATE_SCREENSHOT") == "1":
        buffer = io.BytesIO()
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        assert len(buffer.getvalue()) < SCREENSHOT_MAX_BYTES
        SCREENSHOT.write_bytes(buffer.getvalue())
