"""The status page in headless Chromium (Debian ``chromium``): screenshot and rendered DOM."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.admin import AdminServer, start_admin
from tests.fixtures.common import free_port
from tests.integration.ops_support import TOKEN, NodeDb, new_node_db, populate

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]


def chromium_binary() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian package 'chromium' not installed (bash deploy/install.sh --test): status page "
                    "not rendered")
    return exe


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeDb, AdminServer]]:
    db = populate(new_node_db(tmp_path_factory.mktemp("statuspage"), admin_port=free_port()),
                  queued=4, done=3, failed=2)
    model = {"name": "cxr-test", "version": "7.3.1", "device_uid": "1.2.826.0.1.3680043.10.1234.7"}
    server = start_admin(db.settings, db.engine, db.jobs, model_info=lambda: model)
    try:
        yield db, server
    finally:
        server.stop()


def test_dom_shows_counts_jobs_model_and_failures(page: tuple[NodeDb, AdminServer], tmp_path: Path) -> None:
    db, server = page
    r = chromium(["--dump-dom", f"{server.url}/?token={TOKEN}"], tmp_path / "profile")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert "<title>cxr-node CXRNODE" in dom
    for state, n in db.jobs.counts().items():
        assert re.search(rf'id="count-{state}"[^>]*>{n}<', dom), (state, n)
    rows = re.findall(r'<tr class="job state-(\w+)" id="job-(\d+)"', dom)
    assert {int(i) for _, i in rows} == {i for ids in db.ids.values() for i in ids}
    assert {(s, int(i)) for s, i in rows if s == "done"} == {("done", i) for i in db.ids["done"]}
    for job_id in db.ids["done"]:
        assert f'src="/api/jobs/{job_id}/heatmap.png?size=128"' in dom
    assert 'id="model-version">7.3.1<' in dom
    assert dom.count("pixel data cannot be decoded") == len(db.ids["failed"])
    assert "Not for diagnostic use" in dom


def test_without_token_the_browser_gets_no_page(page: tuple[NodeDb, AdminServer], tmp_path: Path) -> None:
    _, server = page
    r = chromium(["--dump-dom", f"{server.url}/"], tmp_path / "profile")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a valid admin token is required" in r.stdout
    assert 'id="count-queued"' not in r.stdout


def test_screenshot_is_a_rendered_page_with_heatmaps(page: tuple[NodeDb, AdminServer],
                                                     tmp_path: Path) -> None:
    _, server = page
    png = tmp_path / "status.png"
    r = chromium([f"--screenshot={png}", f"{server.url}/?token={TOKEN}"], tmp_path / "profile")
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (900, 1280)
    grey = img.mean(axis=2)
    assert grey.std() > 20  # text and tables, not a blank page
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500  # anti-aliased text and images
    # The header rule and AE title are drawn in the page's blue (#2b5797).
    blue = (np.abs(img - np.array([0x2B, 0x57, 0x97])).sum(axis=2) < 30).sum()
    assert blue > 500
    # Heatmap thumbnails: solid runs of warm overlay colour at least 20 px wide on many rows. Text in the
    # page's reds ("positive", the warning line) never makes runs that long.
    r_, g_, b_ = img[..., 0], img[..., 1], img[..., 2]
    warm = (r_ - b_ > 60) & (r_ - g_ > 60)
    rows_with_runs = sum(1 for row in warm if _longest_run(row) >= 20)
    assert rows_with_runs >= 20, rows_with_runs


def _longest_run(row: np.ndarray) -> int:
    best = cur = 0
    for v in row:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best
